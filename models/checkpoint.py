"""Reading Hugging Face checkpoint folders: ``config.json`` and safetensors shards.

Loading is strict: every tensor of the checkpoint must land on a parameter or buffer of
the model and every parameter must be filled, otherwise the error lists what is unknown
and what is missing (a silently half-loaded model gives plausible but wrong logits), from
the shards' headers, before any tensor is read. Reading a checkpoint of several shards
shows a tqdm bar on stderr (one INFO log line per shard where tqdm is not installed).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import torch
from safetensors import safe_open

__all__ = ["CheckpointTensors", "read_config", "read_tensors", "shard_files", "load_state", "config_dtype"]

log = logging.getLogger(__name__)


def _folder(folder: str | Path) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"folder: {str(folder)!r} is not a directory")
    return path


def read_config(folder: str | Path) -> dict:
    """The checkpoint's ``config.json`` as a dict."""
    path = _folder(folder) / "config.json"
    if not path.is_file():
        raise ValueError(f"folder: no config.json in {str(folder)!r}")
    try:
        with path.open() as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"folder: config.json of {str(folder)!r} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"folder: config.json of {str(folder)!r} is not a JSON object")
    return config


_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def config_dtype(config: dict) -> torch.dtype | None:
    """The checkpoint's dtype from a config dict (``dtype``, or the older ``torch_dtype``), if given."""
    given = {key: config[key] for key in ("dtype", "torch_dtype") if config.get(key) is not None}
    found = set()
    for key, value in given.items():
        if isinstance(value, torch.dtype):
            found.add(value)
            continue
        name = str(value).removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"{key}: unsupported dtype {value!r} (expected one of {', '.join(_DTYPES)})")
        found.add(_DTYPES[name])
    if len(found) > 1:
        raise ValueError(f"dtype: dtype and torch_dtype disagree: {given}")
    return found.pop() if found else None


def shard_files(folder: str | Path) -> list[Path]:
    """The folder's safetensors files, in order: those ``model.safetensors.index.json`` names
    (each must exist), or else every ``*.safetensors`` file. Reads no tensor."""
    folder = _folder(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with index.open() as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"folder: {index.name} in {str(folder)!r} has no weight_map")
        shards = [folder / n for n in sorted(set(weight_map.values()))]
        absent = [p.name for p in shards if not p.is_file()]
        if absent:
            raise ValueError(f"folder: {index.name} in {str(folder)!r} names missing shards: {_listing(absent)}")
        return shards
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"folder: no *.safetensors files in {str(folder)!r}")
    return shards


class CheckpointTensors(Mapping):
    """The tensors of a folder's safetensors shards by name, read one at a time on access.

    Only the shards' headers are read up front, so loading a model converts and places
    one tensor at a time instead of holding the whole checkpoint in host memory.
    """

    def __init__(self, where: dict[str, Path], aliases: dict[str, str] | None = None) -> None:
        self._where = where
        self._aliases = dict(aliases or {})
        self._open: dict[Path, Any] = {}

    def _handle(self, path: Path):
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def _source(self, name: str) -> tuple[Path, str]:
        real = self._aliases.get(name, name)
        return self._where[real], real

    def __getitem__(self, name: str) -> torch.Tensor:
        path, real = self._source(name)
        return self._handle(path).get_tensor(real)

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the shard's header (nothing is read)."""
        path, real = self._source(name)
        return tuple(self._handle(path).get_slice(real).get_shape())

    def __iter__(self) -> Iterator[str]:
        yield from self._where
        yield from self._aliases

    def __len__(self) -> int:
        return len(self._where) + len(self._aliases)

    def __contains__(self, name: object) -> bool:
        return name in self._where or name in self._aliases

    def with_alias(self, name: str, existing: str) -> "CheckpointTensors":
        """The same tensors plus ``name`` standing for ``existing`` (e.g. a tied head)."""
        return CheckpointTensors(self._where, {**self._aliases, name: existing})

    def shard(self, name: str) -> Path:
        """The file ``name`` is read from."""
        return self._source(name)[0]


def read_tensors(folder: str | Path) -> CheckpointTensors:
    """The folder's safetensors tensors by name (read lazily, see :class:`CheckpointTensors`)."""
    where: dict[str, Path] = {}
    for shard in shard_files(folder):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                where[name] = shard
    return CheckpointTensors(where)


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _shape(tensors: Mapping, name: str) -> tuple[int, ...]:
    return tensors.shape(name) if isinstance(tensors, CheckpointTensors) else tuple(tensors[name].shape)


class _ShardProgress:
    """Reports each shard as loading reaches it, ``names`` being the checkpoint tensors to read
    in order (nothing for one shard or a plain mapping): a tqdm bar when ``wanted`` and tqdm is
    installed, else one INFO log line per shard (DEBUG when not wanted)."""

    def __init__(self, tensors: Mapping, names: Iterable[str], wanted: bool) -> None:
        self.shard = tensors.shard if isinstance(tensors, CheckpointTensors) else None
        self.total = len({self.shard(n) for n in names}) if self.shard is not None else 0
        self.wanted, self.seen, self.bar = wanted, set(), None
        if wanted and self.total > 1:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # not a dependency: log lines instead
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=self.total, desc="Loading checkpoint shards", unit="shard")

    def reading(self, name: str) -> None:
        if self.total <= 1:
            return
        shard = self.shard(name)
        if shard in self.seen:
            return
        if self.seen and self.bar is not None:
            self.bar.update(1)  # the shard before is done
        self.seen.add(shard)
        level = logging.INFO if self.wanted and self.bar is None else logging.DEBUG
        log.log(level, "loading shard %d/%d: %s", len(self.seen), self.total, shard.name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, *_) -> None:
        if self.bar is not None:
            if kind is None:
                self.bar.update(len(self.seen) - self.bar.n)  # the last shard is done
            self.bar.close()


def load_state(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    rename: Callable[[str], str | None] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    fp32_names: tuple[str, ...] = (),
    progress: bool = True,
) -> None:
    """Put ``tensors`` into ``module``'s parameters and persistent buffers, strictly.

    ``rename`` maps a checkpoint name to the module's name (or None to drop a tensor the
    model deliberately does not use). Shapes must agree exactly. Each tensor is converted
    to ``dtype`` (default: the parameter's own; fp32 for names ending in ``fp32_names``)
    on ``device`` (default: the parameter's own) and assigned, so a module built on the
    meta device loads without ever being materialised at random.

    Reading a checkpoint of several shards reports each shard (``progress``): a tqdm bar on
    stderr where tqdm is installed, else one INFO line per shard on this module's logger.
    """
    own = dict(module.state_dict(keep_vars=True))
    unknown, wrong_shape, plan = [], [], {}  # plan: module name -> checkpoint name
    for name in tensors:  # names and shapes only (the shards' headers): nothing is read yet
        target = rename(name) if rename is not None else name
        if target is None:
            continue
        if target not in own:
            unknown.append(name)
            continue
        shape = _shape(tensors, name)
        if tuple(own[target].shape) != shape:
            wrong_shape.append(f"{name}: checkpoint {list(shape)}, model {list(own[target].shape)}")
            continue
        plan[target] = name
    missing = set(own) - set(plan)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown checkpoint tensors: {_listing(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing parameters: {_listing(missing)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches: {_listing(wrong_shape)}")
    if problems:  # before reading any tensor: a mismatch shows at once, even in a large checkpoint
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
    state = {}
    with _ShardProgress(tensors, plan.values(), progress) as shards:
        for target, name in plan.items():
            param = own[target]
            to = torch.float32 if fp32_names and target.endswith(fp32_names) else (dtype or param.dtype)
            place = device if device is not None else (param.device if param.device.type != "meta" else "cpu")
            shards.reading(name)
            tensor = tensors[name]
            state[target] = tensor.to(device=place, dtype=to if tensor.is_floating_point() else tensor.dtype)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ValueError(f"checkpoint does not match the model: {len(left)} tensors not in any checkpoint: {_listing(left)}")
    log.info("loaded %d tensors into %s", len(state), type(module).__name__)
