"""Unpickling without running code: torch's weights-only loader plus an explicit allowlist.

Every pickled input grokpipe reads (legacy grokking runs, Hugging Face ``.bin`` shards, DeepSpeed
``.pt`` states, torch.distributed.checkpoint ``.metadata``) goes through here. The few classes those
files really pickle are mapped to inert stand-ins (:class:`StandIn`: a holder of the pickled
fields); any other global is refused before anything runs, naming it. Loaded objects are checked
against crafted expansion (memo-shared containers, self-containing lists, tensor views larger than
their storage), so a small hostile file cannot exhaust memory once used.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import _weights_only_unpickler

from ..errors import GrokpipeError
from .paths import regular_file

NUMERIC_DTYPE_CODES = "?bBhHiIlLqQefdgFD"
MAX_SCALAR_BYTES = 32  # the widest numeric scalar (complex long double)
MAX_VISITS = 5_000_000  # items the loaded object may expand to, memo-shared containers counted per use
MAX_DEPTH = 64  # nesting of containers (the demo's dict is 3 deep)


class StandIn:
    """An inert stand-in for a pickled class: keeps the pickled fields as a plain dict (or, for
    classes that pickle a tuple state, the tuple under ``"state"``). Nothing of the real class runs."""

    def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ calls only __new__; BUILD may never follow
        obj = super().__new__(cls)
        obj.fields = {}
        return obj

    def __init__(self, *args, **kwargs):
        pass

    @staticmethod
    def merged(state):
        """Pickle's BUILD state: the instance __dict__, possibly with a slot-state dict beside it
        (merged into one dict); anything else as it is."""
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            return {**(state[0] or {}), **(state[1] or {})}
        return state

    def __setstate__(self, state):
        state = self.merged(state)
        self.fields = dict(state) if isinstance(state, dict) else {"state": state}

    def __repr__(self):
        return f"{type(self).__name__}({self.fields!r})"


def stand_in(name: str) -> type[StandIn]:
    """A new StandIn subclass called ``name`` (one per pickled class, so the two can be told apart)."""
    return type(name, (StandIn,), {})


def _numeric_dtype(np, spec):
    """``numpy.dtype(spec)`` for numeric dtypes only: ``dtype('V500000000')`` would make the scalar
    that follows allocate half a gigabyte from a 1 KB file."""
    dtype = np.dtype(spec)
    if dtype.char not in NUMERIC_DTYPE_CODES or dtype.itemsize > MAX_SCALAR_BYTES:
        raise ValueError(f"numpy dtype {str(dtype)!r} is not a numeric scalar type")
    return dtype


def numpy_allowlist() -> list:
    """numpy scalars (TransformerLens computes e.g. ``attn_scale`` with ``np.sqrt``) pickle through
    ``multiarray.scalar(dtype, bytes)``, which only rebuilds a number. Both are mapped to guarded
    stand-ins under the numpy 1.x and 2.x paths: numeric dtypes only, bytes of exactly that size."""
    try:
        import numpy as np
    except ImportError:  # files without numpy scalars still load
        return []
    core = getattr(np, "_core", None) or np.core
    real_scalar = core.multiarray.scalar

    def dtype(spec, align=False, copy=False):
        return _numeric_dtype(np, spec)

    def scalar(dtype_, data=None):
        dtype_ = _numeric_dtype(np, dtype_)
        if not isinstance(data, bytes) or len(data) != dtype_.itemsize:
            raise ValueError(f"numpy scalar of {dtype_} with {type(data).__name__} data of the wrong size")
        return real_scalar(dtype_, data)

    entries = [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        (dtype, "numpy.dtype"),
    ]
    for code in NUMERIC_DTYPE_CODES:
        cls = type(np.dtype(code))
        entries.append((cls, f"numpy.dtypes.{cls.__name__}"))
    return entries


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_CALL_RE = re.compile(r"unrecognized function (.+?)(?: which belongs|$)")


def refusal(path: Path, exc: Exception, allowed: str) -> GrokpipeError:
    """One line saying why the unpickler stopped; ``allowed`` says what the allowlist holds."""
    text = str(exc)
    named = _GLOBAL_RE.search(text)
    if named:
        return GrokpipeError(
            f"{path}: refused: the pickle names global {named.group(1)}, which is not on grokpipe's allowlist "
            f"({allowed}); nothing from it was run or written"
        )
    called = _CALL_RE.search(text)
    if called:
        return GrokpipeError(f"{path}: refused: the pickle calls {called.group(1)}; nothing from it was run or written")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return GrokpipeError(f"{path}: not a readable PyTorch pickle ({first})")


def check_container(path: Path, source=None) -> None:
    """The zip container torch.save writes (since torch 1.6): members stored, never compressed, so
    the tensor data cannot exceed the file (a deflated member could expand into a zip bomb).
    ``source`` is the file object to check when the archive is not the whole file at ``path``."""
    source = path if source is None else source
    if not zipfile.is_zipfile(source):
        raise GrokpipeError(
            f"{path}: not a readable PyTorch pickle (not the zip format torch.save writes since torch 1.6; "
            "the older format declares storage sizes the restricted loader cannot bound, so it is not read)"
        )
    try:
        with zipfile.ZipFile(source) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise GrokpipeError(f"{path}: not a readable PyTorch pickle ({exc})") from None
    for member in members:
        if member.compress_type != zipfile.ZIP_STORED:
            raise GrokpipeError(
                f"{path}: refused: zip member {member.filename} is compressed (torch.save never does that)"
            )
    total = sum(member.file_size for member in members)
    size = path.stat().st_size if source is path else len(source.getbuffer())
    if total > size:
        raise GrokpipeError(f"{path}: refused: its members claim {total} bytes, more than the file holds")


def check_bounded(path: Path, obj) -> None:
    """Refuse what would exhaust memory once used: memo-shared containers that expand a small file
    into billions of items (a list holding the same list 1,000 times, nested), self-containing
    containers, and tensor views claiming more elements than their storage holds. Expanded sizes are
    computed once per distinct object, so checking costs the file's size, not the expansion's."""
    sizes: dict[int, int | None] = {}  # id -> expanded size; None while being expanded (a cycle)
    keep = []  # keep every visited object alive so that ids stay unique

    def size(item, depth: int) -> int:
        if torch.is_tensor(item):
            needed = item.numel() * item.element_size()
            if needed > item.untyped_storage().nbytes():
                raise GrokpipeError(
                    f"{path}: refused: a tensor of shape {list(item.shape)} claims {needed} bytes over a "
                    f"{item.untyped_storage().nbytes()}-byte storage"
                )
            return 1
        if isinstance(item, StandIn):
            item = item.fields
        if not isinstance(item, (dict, list, tuple, set, frozenset)):
            return 1
        key = id(item)
        if key in sizes:
            if sizes[key] is None:
                raise GrokpipeError(f"{path}: refused: a container holds itself")
            return sizes[key]
        if depth > MAX_DEPTH:
            raise GrokpipeError(f"{path}: refused: containers nested more than {MAX_DEPTH} deep")
        sizes[key] = None
        keep.append(item)
        children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
        total = 1 + sum(size(child, depth + 1) for child in children)
        if total > MAX_VISITS:
            raise GrokpipeError(f"{path}: refused: its containers expand to more than {MAX_VISITS} items")
        sizes[key] = total
        return total

    size(obj, 0)


def safe_torch_load(path: str | Path, allowlist: list, allowed: str, mmap: bool = False, data: bytes | None = None):
    """Unpickle the ``torch.save`` file ``path`` with the weights-only loader extended by
    ``allowlist`` (``(stand_in, "module.Name")`` pairs), every tensor on CPU, within bounds.

    ``mmap=True`` maps tensor data instead of reading it; ``data`` loads these bytes instead of the
    file (an archive embedded in a larger file), ``path`` then only names it in messages.
    """
    path = Path(path)
    if data is None:
        regular_file(path)  # a FIFO would block the reader forever
    source = path if data is None else io.BytesIO(data)
    check_container(path, source)
    if data is not None:
        source.seek(0)
    if mmap and data is None:
        # torch's memory-mapped path slices each storage out of the file by its claimed size without
        # checking it against the record (the read path does): check it here first.
        check_storage_sizes(path, allowlist, allowed)
    try:
        with torch.serialization.safe_globals(allowlist), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and data is None)
    except Exception as exc:  # weights-only unpickling cannot run code, so any failure is a bad file
        raise refusal(path, exc, allowed) from None
    check_bounded(path, loaded)
    return loaded


def check_storage_sizes(path: Path, allowlist: list, allowed: str) -> None:
    """Every storage the pickle declares has a record in the archive at least as large as its claimed
    size. Reads the pickle only, through the same weights-only unpickler and allowlist as the load,
    with storages on the meta device (no tensor data is read or allocated)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickle_name = next(name for name in names if name == "data.pkl" or name.endswith("/data.pkl"))
            data_prefix = pickle_name.removesuffix("data.pkl") + "data/"
            records = {
                name.removeprefix(data_prefix): archive.getinfo(name).file_size
                for name in names
                if name.startswith(data_prefix)
            }
            pickled = archive.read(pickle_name)
    except StopIteration:
        raise GrokpipeError(f"{path}: not a readable PyTorch pickle (no data.pkl in the archive)") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise GrokpipeError(f"{path}: not a readable PyTorch pickle ({exc})") from None

    def persistent_load(pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise GrokpipeError(f"{path}: refused: the pickle declares a storage as {type(pid).__name__}")
        _, storage_type, key, _location, numel = pid
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else getattr(storage_type, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(numel, int) or numel < 0:
            raise GrokpipeError(f"{path}: refused: storage {key!r} is declared as {numel!r} of {storage_type!r}")
        claimed, held = numel * dtype.itemsize, records.get(str(key))
        if held is None:
            raise GrokpipeError(f"{path}: refused: storage {key!r} has no record in the archive")
        if claimed > held:
            raise GrokpipeError(f"{path}: refused: storage {key!r} claims {claimed} bytes but its record holds {held}")
        meta = torch.UntypedStorage(claimed, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    try:
        with torch.serialization.safe_globals(allowlist), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
            unpickler.persistent_load = persistent_load
            unpickler.load()
    except GrokpipeError:
        raise
    except Exception as exc:  # weights-only unpickling cannot run code, so any failure is a bad file
        raise refusal(path, exc, allowed) from None


class _AllowlistUnpickler(pickle.Unpickler):
    def __init__(self, fh, allowlist: dict[tuple[str, str], object]):
        super().__init__(fh)
        self._allowlist = allowlist

    def find_class(self, module, name):
        try:
            return self._allowlist[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"Unsupported GLOBAL {module}.{name}") from None


def safe_pickle_load(path: str | Path, allowlist: dict[tuple[str, str], object], allowed: str, max_bytes: int):
    """Unpickle a plain ``pickle.dump`` file (not a torch zip) whose globals must all be keys of
    ``allowlist`` (``(module, name) -> stand-in``); the file is bounded by ``max_bytes``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise GrokpipeError(f"{path}: refused: {size} bytes, more than the {max_bytes} such a file may hold")
        with open(path, "rb") as fh:
            loaded = _AllowlistUnpickler(fh, allowlist).load()
    except GrokpipeError:
        raise
    except OSError as exc:
        raise GrokpipeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # find_class refuses every other global, so nothing ran
        raise refusal(path, exc, allowed) from None
    check_bounded(path, loaded)
    return loaded
