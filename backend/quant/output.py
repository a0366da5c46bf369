"""The output directory of `trimtab convert`: also its work directory, so later stages can resume.

    out = OutputDir.claim(path, options, reserved=tokenizer_names, force=False, shard_bytes=8 << 30)
    out.add_tensors({...})             # layer by layer; shards fill up to the shard size
    files = out.finish(config, write_tokenizer)

Rules:
- a directory is ours when it holds WORK_DIR/JOB (written first, before anything else); a
  non-empty directory that is not ours is refused unless `force`, and even then no file that is
  not ours is ever replaced: convert refuses to start if one of its output names is taken;
- re-using our own directory first removes the previous model's config.json, then its other files;
- every file is written under a temporary name and renamed when complete; shards wait in WORK_DIR
  until the end, and config.json is written last, so an interrupted convert leaves no directory
  that loads as a half-written model;
- a calibrated convert keeps each finished part (the head, each decoder layer) in WORK_DIR as its own
  file (`save_part`) and counts it in the job record only once the file is complete, so a convert
  that is interrupted (Ctrl-C, kill -9, power) and run again with the same options resumes after the
  last finished part (`resume_or_claim`).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from trimtab.backend.errors import TrimtabError
from trimtab.backend.hf_export import write_atomically, write_json
from trimtab.backend.hf_loader import CONFIG_NAME, INDEX_NAME, SINGLE_WEIGHTS_NAME

WORK_DIR = ".trimtab-convert"
JOB = "job.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


class OutputDir:
    def __init__(self, path: Path, job: dict, shard_bytes: int):
        self.path = path
        self.work = path / WORK_DIR
        self.job = job
        self.shard_bytes = shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[Path] = []       # complete shards in the work dir, in order

    @classmethod
    def check(cls, path: str | os.PathLike, *, reserved: tuple[str, ...], force: bool,
              source: str | None = None) -> set[str]:
        """Refuse `path` by the rules above (changing nothing); → the names of our previous files there.
        `reserved`: the file names convert writes besides the model files and config.json. `source`: the
        model being converted; a job of another model there is refused unless `force`."""
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise TrimtabError(f"{path}: exists and is not a directory")
        previous = _read_job(path / WORK_DIR / JOB)
        before = ((previous or {}).get("options") or {}).get("input") if isinstance(previous, dict) else None
        if source is not None and before is not None and before != source and not force:
            raise TrimtabError(f"{path}: holds a convert of {before}, not of {source}; choose another directory, "
                               "or pass --force to replace it")
        # only names convert writes count as ours: a hand-edited record cannot point elsewhere
        ours = {name for name in (previous or {}).get("files", [])
                if isinstance(name, str) and _is_output_name(name, reserved)}
        if previous is None and path.is_dir() and any(path.iterdir()) and not force:
            raise TrimtabError(f"{path}: directory is not empty and was not made by trimtab convert; choose a new "
                               "or empty directory, or pass --force to write beside what is there")
        if path.is_dir():
            taken = sorted(name for name in os.listdir(path) if name not in ours and _is_output_name(name, reserved))
            if taken:
                raise TrimtabError(f"{path / taken[0]}: exists and was not written by trimtab convert, so it is never "
                                   "replaced; move it away or choose another directory")
        return ours

    @classmethod
    def claim(cls, path: str | os.PathLike, options: dict, *, reserved: tuple[str, ...], force: bool,
              shard_bytes: int) -> "OutputDir":
        """Make `path` ours (after `check`): record the job, remove our previous model."""
        ours = cls.check(path, reserved=reserved, force=force)
        path = Path(path).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        out = cls(path, {"tool": "trimtab convert", "options": options, "stage": "quantize", "files": []},
                  shard_bytes)
        out.work.mkdir(exist_ok=True)
        # the old model stops loading first (config.json), then its other files go
        for name in sorted(ours, key=lambda n: n != CONFIG_NAME):
            (path / name).unlink(missing_ok=True)
        for stale in out.work.glob("shard-*.safetensors"):
            stale.unlink()
        out._save_job()
        return out

    @classmethod
    def resume_or_claim(cls, path: str | os.PathLike, options: dict, *, reserved: tuple[str, ...], force: bool,
                        shard_bytes: int) -> tuple["OutputDir", bool]:
        """Our unfinished job with the same options resumes (→ True); anything else starts afresh (claim)."""
        cls.check(path, reserved=reserved, force=force, source=options.get("input"))
        path = Path(path).expanduser()
        previous = _read_job(path / WORK_DIR / JOB)
        if previous is not None and previous.get("options") == options and previous.get("stage") not in ("done", None):
            out = cls(path, previous, shard_bytes)
            for stale in out.work.glob("shard-*.safetensors"):   # shards are rebuilt from the parts
                stale.unlink()
            return out, True
        out = cls.claim(path, options, reserved=reserved, force=force, shard_bytes=shard_bytes)
        for stale in list(out.work.glob("part-*.safetensors")):
            stale.unlink()
        return out, False

    def update_job(self, **values) -> None:
        self.job.update(values)
        self._save_job()

    def save_part(self, name: str, tensors: Mapping[str, torch.Tensor], **job_values) -> None:
        """Keep a finished part in the work dir; the job counts it (job_values) once the file is complete."""
        from safetensors.torch import save_file

        tensors = {k: t.contiguous() for k, t in tensors.items()}
        write_atomically(self.work / f"part-{name}.safetensors",
                         lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        self.update_job(**job_values)

    def read_part(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.work / f"part-{name}.safetensors")

    def remove_parts(self) -> None:
        for part in self.work.glob("part-*.safetensors"):
            part.unlink()

    def add_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Queue one layer's tensors; they share a shard, which is written once it is full."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.shard_bytes:
            self._flush()
        self._pending.update({name: t.contiguous() for name, t in tensors.items()})
        self._pending_bytes += size

    def finish(self, config: dict, write_tokenizer: Callable[[Path], tuple[str, ...]],
               extra: tuple[str, ...] = ()) -> list[str]:
        """Move the shards into place, write the index, tokenizer files and config.json (last).
        `extra`: files already written beside them (a measurement) that stay listed as ours."""
        self._flush()
        count = len(self._shards)
        names = ([SINGLE_WEIGHTS_NAME] if count == 1 else
                 [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        files = list(extra) + names + ([INDEX_NAME] if count > 1 else [])
        self.job.update(stage="finish", files=files + [CONFIG_NAME])  # claimed before they are written
        self._save_job()
        from safetensors import safe_open

        weight_map = {}
        for shard, name in zip(self._shards, names):
            with safe_open(str(shard), framework="pt") as handle:
                weight_map.update(dict.fromkeys(handle.keys(), name))
            os.replace(shard, self.path / name)
        if count > 1:
            write_json(self.path / INDEX_NAME, {"metadata": {}, "weight_map": weight_map})
        files += list(write_tokenizer(self.path))
        self.job.update(files=files + [CONFIG_NAME])
        self._save_job()
        write_json(self.path / CONFIG_NAME, config)
        self.job.update(stage="done")
        self._save_job()
        return files + [CONFIG_NAME]

    def _flush(self) -> None:
        if not self._pending:
            return
        from safetensors.torch import save_file

        shard = self.work / f"shard-{len(self._shards) + 1:05d}.safetensors"
        tensors = self._pending
        write_atomically(shard, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
        self._shards.append(shard)
        self._pending, self._pending_bytes = {}, 0

    def _save_job(self) -> None:
        write_json(self.work / JOB, self.job)


def _read_job(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise TrimtabError(f"{path}: unreadable; this looks like an interrupted convert's work record: remove "
                           f"{path.parent} to start over") from None
    if not isinstance(job, dict) or not isinstance(job.get("files", []), list):
        raise TrimtabError(f"{path}: not a trimtab convert work record; remove {path.parent} to start over")
    return job


def _is_output_name(name: str, reserved: tuple[str, ...]) -> bool:
    return name in (CONFIG_NAME, SINGLE_WEIGHTS_NAME, INDEX_NAME, *reserved) or bool(_SHARD_NAME.match(name))
