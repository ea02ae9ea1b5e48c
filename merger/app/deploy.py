"""Create or update the Space from this checkout: `make deploy SPACE=owner/name [CARD=space/README.md]`.

The Space repository receives the project's files (those git tracks or would track: `git ls-files
--cached --others --exclude-standard`, as they are in the working tree) with the chosen Space card as
its README.md (the repository's own README.md is the developer set-up, not a Space card). The card's
front matter says which SDK the Space runs (`sdk: docker` for space/README.md); another card, such as a
Gradio-SDK one for ZeroGPU, deploys the same way. Files that are no longer in the project are removed
from the Space in the same commit.

Everything goes through huggingface_hub (HF_ENDPOINT honoured): `create_repo(repo_type="space",
space_sdk=..., exist_ok=True)`, then one `upload_folder` commit. The token is --token, else HF_TOKEN, else
the one saved by `hf auth login`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ..errors import HubError, MergerError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CARD = Path("space") / "README.md"
SDKS = ("docker", "gradio", "static")
_FRONT_MATTER = re.compile(r"^---\n(.*?)\n---\n", re.DOTALL)


def card_sdk(text: str, name: str = "the card") -> str:
    """The `sdk` of a Space card's YAML front matter (docker, gradio or static)."""
    m = _FRONT_MATTER.match(text)
    try:
        meta = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError:
        meta = None
    if not isinstance(meta, dict):
        raise MergerError(f"{name} has no YAML front matter between '---' lines; a Space card starts with one")
    sdk = meta.get("sdk")
    if sdk not in SDKS:
        raise MergerError(f"{name} says sdk: {sdk!r}; a Space card needs sdk: docker, gradio or static")
    return str(sdk)


def project_files(root: Path) -> list[str]:
    """The project's files in `root`: tracked ones and new ones git does not ignore (no .venv, outputs, ...)."""
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        raise MergerError(f"{root} is not a git checkout; deploy from a clone of the project") from None
    return [p for p in listed.stdout.decode().split("\0") if p and (root / p).is_file()]


def stage(root: Path, card: Path, into: Path) -> int:
    """Copy the project's files into `into`, the card as README.md; returns the number of files. A
    requirements.txt beside the card (space/zerogpu/: a Gradio SDK Space installs the root one, with
    ZeroGPU's torch) becomes the Space's requirements.txt."""
    files = [p for p in project_files(root) if p != "README.md"]
    for rel in files:
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    shutil.copyfile(card, into / "README.md")
    own = card.parent / "requirements.txt"
    if own.is_file() and own.resolve() != (root / "requirements.txt").resolve():
        shutil.copyfile(own, into / "requirements.txt")
        files = sorted({*files, "requirements.txt"})
    return len(files) + 1


def deploy(space_id: str, *, card: Path | None = None, root: Path = REPO_ROOT, token: str | None = None,
           private: bool = False) -> str:
    """Create the Space if needed and upload the project with `card` as its README; returns the Space URL."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..hub import hub_endpoint, validate_repo_id

    validate_repo_id(space_id)
    card = Path(card) if card is not None else root / DEFAULT_CARD
    if not card.is_file():
        raise MergerError(f"Space card {card} does not exist; give an existing card file (CARD=space/README.md)")
    sdk = card_sdk(card.read_text(encoding="utf-8"), str(card))
    api = HfApi(endpoint=hub_endpoint(), token=token)
    web = f"{hub_endpoint()}/spaces/{space_id}"
    try:
        api.create_repo(space_id, repo_type="space", space_sdk=sdk, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="space-deploy-") as tmp:
            count = stage(root, card, Path(tmp))
            api.upload_folder(folder_path=tmp, repo_id=space_id, repo_type="space", delete_patterns="*",
                              commit_message=f"Deploy {count} files with {card.name} ({sdk} SDK)")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hints = {
            401: "the Hub rejected the token; log in with `hf auth login` or set HF_TOKEN to a write token",
            402: (f"the Hub asks for a paid plan or a payment method to create a {sdk} Space under "
                  f"'{space_id.split('/')[0]}'; add one in your billing settings or use an account that has one"),
            403: f"your token may not create or write Spaces under '{space_id.split('/')[0]}'; use a write token",
        }
        raise HubError(f"could not deploy {space_id}: " + hints.get(status, f"HTTP {status} from the Hub")) from None
    except (OSError, ValueError, httpx2.HTTPError) as e:  # network down, or metadata the Hub refused
        first = str(e).splitlines()[0] if str(e) else ""
        raise HubError(f"could not deploy {space_id}: {type(e).__name__}: {first}") from None
    return web


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merger.app.deploy", description=(
        "Create or update a Hugging Face Space with this project and a Space card as its README.md."))
    parser.add_argument("space", help="the Space to create or update, as owner/name")
    parser.add_argument("--card", type=Path, default=None,
                        help=f"the Space card to use as README.md (default {DEFAULT_CARD}; its front matter's "
                             "sdk decides the Space SDK)")
    parser.add_argument("--private", action="store_true", help="create the Space private (an existing one is kept "
                                                               "as it is)")
    parser.add_argument("--token", default=None, help="a write token (default: HF_TOKEN, else the saved login)")
    args = parser.parse_args(argv)
    try:
        url = deploy(args.space, card=args.card, token=args.token or os.environ.get("HF_TOKEN") or None,
                     private=args.private)
    except MergerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"deployed: {url} (the Space builds its image now; follow the build logs there)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
