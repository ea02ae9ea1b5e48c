"""The app as a Space serves it, signed in through Hugging Face's OAuth, in a real browser.

app.py runs in its own process with the environment a Space injects (SPACE_ID, SPACE_HOST, SYSTEM=spaces,
OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET, OAUTH_SCOPES from the card, OPENID_PROVIDER_URL) pointing at the local
Hub (tests/hub_space.py), which plays huggingface.co: its OpenID provider, its sign-in and consent pages, and
the repos. Alice (granted the gated parent) signs in, checks, merges and publishes with her own token; Bob,
in a second browser context, sees none of her runs or files and cannot use the gated parent she fetched.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.hub_space import SpaceHub, card_front_matter, granted
from tests.test_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, _set_quants, _wait_status
from tests.test_space import dockerfile_stages, env_of

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ENV = env_of(dockerfile_stages((ROOT / "Dockerfile").read_text())[-1])  # what the image sets
SPACE_ID = "alice/llm-merger"
MODELS = "meta/gated-base\nacme/chat"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _certificate(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out",
                    str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> Iterator[dict]:
    """The local Hub and the app served from another process with a Space's environment."""
    root = tmp_path_factory.mktemp("space")
    port = _free_port()
    with SpaceHub() as hub:
        hub.upload_folder(tiny["base"], "meta/gated-base", gated="manual", allowed_users={"alice"})
        hub.upload_folder(tiny["chat"], "acme/chat")
        secret = secrets.token_hex(16)
        hub.register_client("space-client", secret, f"https://127.0.0.1:{port}/login/callback")
        scopes = card_front_matter((ROOT / "space" / "README.md").read_text(encoding="utf-8"))["hf_oauth_scopes"]
        (root / "jobs").mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OAUTH_", "GRADIO_"))}
        env.update({
            "SPACE_ID": SPACE_ID, "SPACE_HOST": f"127.0.0.1:{port}", "SYSTEM": IMAGE_ENV["SYSTEM"],
            "OAUTH_CLIENT_ID": "space-client", "OAUTH_CLIENT_SECRET": secret, "OAUTH_SCOPES": granted(scopes),
            "OPENID_PROVIDER_URL": hub.url, "PORT": str(port),
            "HF_ENDPOINT": hub.url, "HF_HOME": str(root / "hf"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(root / "jobs"),
            "GRADIO_TEMP_DIR": str(root / "gradio"),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        cert, key = _certificate(root)
        log = (root / "app.log").open("wb")
        proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "space_serve.py"), str(cert), str(key)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"https://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    if httpx.get(url + "/", verify=False, timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the app did not start as a Space:\n" + (root / "app.log").read_text()[-3000:])
                time.sleep(0.5)
            yield {"hub": hub, "url": url, "root": root, "log": root / "app.log"}
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


@pytest.fixture(scope="module")
def browser(space: dict):  # noqa: ANN201 - playwright Browser
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _sign_in(browser, space: dict, user: str, password: str, orgs: tuple[str, ...] = ()):  # noqa: ANN001, ANN202
    """A fresh browser context (its own cookies) signed in as `user` through the sign-in and consent pages."""
    context = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(space["url"])
    login = page.get_by_role("button", name="Sign in with Hugging Face")
    login.click()
    page.wait_for_url(f"{space['hub'].url}/oauth/authorize*")
    page.fill("#username", user)
    page.fill("#password", password)
    page.click("#login")
    page.locator("#authorize").wait_for()
    assert page.locator("#signed-in-as").inner_text() == f"Signed in as {user}"
    asked = [li.get_attribute("data-scope") for li in page.locator("#scopes li").all()]
    assert {"gated-repos", "read-repos", "write-repos", "manage-repos", "jobs"} <= set(asked)
    for org in orgs:
        page.check(f"#org-{org}")
    page.screenshot(path=str(ARTIFACTS / f"space-consent-{user}.png"), full_page=True)
    page.click("#authorize")
    page.wait_for_url(f"{space['url']}/**")
    page.get_by_role("button", name=f"Logout ({user})").wait_for()
    return context, page


def _use_models(page) -> None:  # noqa: ANN001
    box = page.locator("#models-box textarea")
    box.fill(MODELS)
    box.press("Tab")
    page.wait_for_function("document.querySelector('#editor .cm-content').innerText.includes('meta/gated-base')")


def test_sign_in_check_merge_publish_and_users_kept_apart(browser, space: dict) -> None:  # noqa: ANN001
    hub: SpaceHub = space["hub"]
    alice_ctx, alice = _sign_in(browser, space, "alice", "alice-password")
    token = hub.tokens_of("alice")[-1]
    assert {"gated-repos", "manage-repos", "jobs"} <= hub.tokens[token].scopes
    _use_models(alice)
    alice.click("#check")
    alice.locator("#report", has_text="OK").wait_for()
    assert "gated (granted)" in alice.locator("#report").inner_text()
    repo_box = alice.locator("#repo-name textarea, #repo-name input").first
    assert repo_box.input_value().startswith("alice/")  # the default name is in her namespace
    repo_box.fill("alice/gated-chat-slerp")
    _set_quants(alice, set())
    assert alice.locator("#publish input").is_checked()
    alice.click("#merge")
    _wait_status(alice, "done")
    result = alice.locator("#result").inner_text()
    assert f"{hub.url}/alice/gated-chat-slerp" in result and "Files in" not in result
    assert {"model.safetensors", "mergekit_config.yml", "README.md"} <= set(hub.repo_files("alice/gated-chat-slerp"))
    assert hub.created_with["alice/gated-chat-slerp"] == hub.tokens[token]  # her own OAuth token made it
    alice.screenshot(path=str(ARTIFACTS / "space-alice-published.png"), full_page=True)
    # Nothing of hers is left on the Space's disk: no job folder, no downloaded parent.
    assert list((space["root"] / "jobs").iterdir()) == []
    hub_cache = space["root"] / "hf" / "hub"
    assert not (hub_cache.exists() and any(hub_cache.glob("models--*/blobs/*")))
    served = hub.stats.total_bytes("meta/gated-base")

    bob_ctx, bob = _sign_in(browser, space, "bob", "bob-password")
    for panel in ("#result", "#report", "#progress"):
        assert bob.locator(panel).inner_text().strip() == ""
    assert bob.locator("#log textarea").input_value() == ""
    assert bob.locator("#cancel").is_disabled()  # her job is not his to reach: he has none to cancel
    _use_models(bob)
    assert bob.locator("#repo-name textarea, #repo-name input").first.input_value().startswith("bob/")
    bob.click("#check")
    bob.locator("#report", has_text="Not mergeable").wait_for()
    assert "meta/gated-base is gated: accept its licence" in bob.locator("#report").inner_text()
    _set_quants(bob, set())
    bob.click("#merge")
    bob.locator("#run-note", has_text="Merge did not start").wait_for()  # its Check failed
    assert bob.locator("#progress .merge-progress").count() == 0
    bob.locator("#editor .cm-content").click()  # edited after the check: the job checks it itself, and refuses
    bob.keyboard.press("Control+End")
    bob.keyboard.insert_text("\n# edited after the check\n")
    bob.locator("#report .msg-stale").wait_for()
    bob.click("#merge")
    _wait_status(bob, "failed")
    assert "is gated" in bob.locator("#result").inner_text()
    assert hub.stats.total_bytes("meta/gated-base") == served  # not a byte of the gated parent for him
    assert not any(r.startswith("bob/") for r in hub.repos)
    bob.screenshot(path=str(ARTIFACTS / "space-bob-refused.png"), full_page=True)
    log = space["log"].read_text(errors="replace")
    # The one traceback allowed: gradio starts its Spaces hot-reload watcher on any Space, and that thread
    # stops at once without the `spaces` package (preinstalled on Gradio-SDK Spaces); the app is unaffected.
    assert log.count("Traceback") == log.count("`spaces` package is required to run hot-reloading in Spaces")
    assert not any(t in log for t in hub.tokens_of("alice") + hub.tokens_of("bob"))  # no token is ever logged
    bob_ctx.close()
    alice_ctx.close()


def test_a_sign_in_expired_while_queued_is_reported_before_the_run(browser, space: dict) -> None:  # noqa: ANN001
    hub: SpaceHub = space["hub"]
    context, page = _sign_in(browser, space, "alice", "alice-password")
    _use_models(page)
    page.locator("#repo-name textarea, #repo-name input").first.fill("alice/never-made")
    _set_quants(page, set())
    hub.expire_tokens("alice")  # the Hub expired it; the app's session has not noticed yet
    page.click("#merge")
    page.locator("#result", has_text="sign-in expired while the merge waited in the queue").wait_for()
    assert "alice/never-made" not in hub.repos
    assert page.locator("#result").inner_text().count("\n") == 0
    context.close()
