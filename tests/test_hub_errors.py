"""Hub answers no code path expects (HTTP 400, 451) are reported with their status and the request made,
never as a bare exception class name and never with the token (the local Hub server injects them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from merger import hub as mhub
from merger import hub_errors
from merger.errors import HubError, MergerError
from merger.pipeline import RunOptions, run
from merger.recipe import parse_recipe
from tests.conftest import ACME_TIES_RECIPE
from tests.hubserver import HubServer

TOKEN = "hf_alice_write"


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_errors, "RETRY_DELAYS", (0.0, 0.0))


@pytest.fixture
def published(hub: HubServer, tiny: dict[str, Path]) -> HubServer:
    hub.upload_folder(tiny["base"], "acme/base")
    hub.upload_folder(tiny["chat"], "acme/chat")
    return hub


def _line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text and TOKEN not in text and "Traceback" not in text
    assert "HfHubHTTPError" not in text and "HTTPError" not in text
    return text


@pytest.mark.parametrize("fault,status", [("bad_request", "HTTP 400 Bad Request"),
                                          ("legal", "HTTP 451 Unavailable For Legal Reasons")])
def test_unexpected_status_on_model_info_says_status_and_request(published: HubServer, fault: str,
                                                                 status: str) -> None:
    published.inject("info", fault, times=None)
    with pytest.raises(HubError) as e:
        mhub.resolve("acme/base", token=TOKEN)
    line = _line(e)
    assert line.startswith("could not read acme/base: the Hub answered " + status), line
    assert f"to GET {published.url}/api/models/acme/base" in line, line
    assert published.stats.requests["info"] == 1  # a 4xx is not retried


def test_unexpected_status_on_a_download_names_the_file_requested(published: HubServer, tmp_path: Path) -> None:
    published.inject("resolve_get", "legal", times=None, repo="acme/chat", path="model.safetensors")
    with pytest.raises(MergerError) as e:  # the pre-flight check reads the header: a range GET of the file
        run(parse_recipe(ACME_TIES_RECIPE), RunOptions(tmp_path / "out", device="cpu", token=TOKEN))
    line = _line(e)
    assert "HTTP 451 Unavailable For Legal Reasons to GET " in line, line
    assert "/acme/chat/resolve/" in line and line.split(" to GET ", 1)[1].split()[0].endswith("/model.safetensors")
    assert '("acme/chat is unavailable for legal reasons")' in line, line
    assert not (tmp_path / "out").exists()


def test_unexpected_status_on_push_names_the_request(published: HubServer, tiny: dict[str, Path],
                                                     tmp_path: Path) -> None:
    published.inject("preupload", "bad_request", times=None)
    with pytest.raises(HubError) as e:
        mhub.push_folder(tiny["base"], "alice/pushed", token=TOKEN, private=False)
    line = _line(e)
    assert "could not upload to alice/pushed: the Hub answered HTTP 400 Bad Request to POST " in line, line
    assert "/api/models/alice/pushed/preupload/main" in line and '("Bad request: unexpected parameter")' in line
