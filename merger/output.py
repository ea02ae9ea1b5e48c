"""The output folder: mergekit's layout, written to a temporary sibling and renamed into place at the end.

A failed, cancelled or killed run never leaves something that looks like a finished model: until the
final rename, everything lives in `.NAME.partial-<pid>-<id>`, which the next run removes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Mapping

from .errors import ModelError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
PARTIAL_MARK = ".partial-"

CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
               " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
    "alpaca": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
               "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
               "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + "
               "'\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"),
    "llama3": ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    "mistral": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"),
}


def partial_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}{PARTIAL_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Delete leftovers of earlier runs into out_dir whose process is gone (killed mid-merge)."""
    removed = []
    if not out_dir.parent.exists():
        return removed
    for p in out_dir.parent.glob(f".{out_dir.name}{PARTIAL_MARK}*"):
        try:
            pid = int(p.name.rsplit(PARTIAL_MARK, 1)[1].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def ensure_output_free(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse to clobber an existing, non-empty output unless asked (checked before any work starts)."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise ModelError(f"{out_dir} already exists and is not empty; choose another folder or pass --overwrite")


def prepare_output(out_dir: Path, *, overwrite: bool) -> Path:
    """A fresh temporary folder beside out_dir, after removing leftovers of killed runs."""
    ensure_output_free(out_dir, overwrite=overwrite)
    out_dir = out_dir.resolve()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir)
        tmp = partial_dir(out_dir)
        tmp.mkdir()
    except OSError as e:
        raise ModelError(f"cannot create the output folder next to {out_dir}: {e.strerror}") from None
    return tmp


def commit_output(tmp: Path, out_dir: Path) -> None:
    """Atomically move the finished folder into place (replacing an old output when overwriting)."""
    out_dir = out_dir.resolve()
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def copy_tokenizer(src: Path, dst: Path, chat_template: str | None, *, keep: bool = False) -> list[str]:
    """Tokenizer files (and generation config) from the tokenizer source; apply a chat template override.

    `keep`: the files are already in `dst` (a built tokenizer): only the chat template is applied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            if not keep:
                shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if chat_template and chat_template != "auto":
        template = CHAT_TEMPLATES.get(chat_template, chat_template)
        config_path = dst / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if (dst / "chat_template.jinja").exists():
            (dst / "chat_template.jinja").write_text(template)
        if "tokenizer_config.json" not in copied:
            copied.append("tokenizer_config.json")
    return copied


def write_json(path: Path, data: Mapping) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
