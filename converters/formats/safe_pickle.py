"""The one way nemotune reads a pickle from disk: a restricted unpickler that imports nothing but data classes.

Pickles in the files we read (torch distributed-checkpoint ``.metadata``, the packed ``.npy`` of prepared
data) are data, but plain ``pickle.load`` would call whatever a crafted file names (``os.system`` via
``__reduce__``). :class:`RestrictedUnpickler` admits only the classes these formats hold -- torch DCP's metadata
dataclasses, ``torch.Size``, dtypes and layouts, numpy's array reconstruction, plain containers -- and refuses
any other import with one line naming the file.

megatron-core and torch DCP unpickle a checkpoint's files themselves (``FileSystemReader.read_metadata`` uses
plain ``pickle.load``; byte items in ``.distcp`` files go through ``torch.load(weights_only=False)``), so every
loader first calls :func:`check_checkpoint_files` on the directory: each ``.metadata`` is read here, each byte
item it lists and each ``.pt`` file is checked with ``torch.load(weights_only=True)``, and every tensor item
must lie inside its ``.distcp`` file (a truncated copy is named, not an ``EOFError`` later).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

# module -> names that may be imported while unpickling (nothing callable with side effects)
_ALLOWED: dict[str, frozenset[str]] = {
    "builtins": frozenset({"set", "frozenset", "bytearray", "complex", "slice", "range"}),
    "collections": frozenset({"OrderedDict", "defaultdict", "deque"}),
    "pathlib": frozenset({"Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}),
    "pathlib._local": frozenset({"Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath",
                                 "PureWindowsPath"}),
    "torch": frozenset({"Size"}),  # dtypes are admitted by type below
    "torch.serialization": frozenset({"_get_layout"}),  # maps "torch.strided" to the layout object
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.distributed.checkpoint.planner": frozenset({  # the cached save plans megatron keeps with the metadata
        "SavePlan", "LoadPlan", "WriteItem", "ReadItem", "TensorWriteData", "BytesIOWriteData", "WriteItemType",
        "LoadItemType"}),
    "megatron.core.dist_checkpointing.strategies.torch": frozenset({"MCoreSavePlan"}),  # an empty class
    "numpy": frozenset({"ndarray", "dtype"}),
    "numpy.core.multiarray": frozenset({"_reconstruct", "scalar"}),
    "numpy._core.multiarray": frozenset({"_reconstruct", "scalar"}),
}


class UnsafeFileError(ValueError):
    """A file we were about to read could run code, or is damaged; the message names it and the fix."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` admits only :data:`_ALLOWED` (and torch dtypes / layouts)."""

    def __init__(self, file: BinaryIO, *, source: str | Path):
        super().__init__(file)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise UnsafeFileError(
            f"{self.source}: refusing to unpickle {module}.{name}: this file would import code that "
            "checkpoint metadata never holds (crafted or corrupted?); nothing was run -- re-create the file from "
            "its source (see README: trusted files)")

    def persistent_load(self, pid):  # torch.save's storages never appear in these files
        raise UnsafeFileError(f"{self.source}: unexpected persistent id in a metadata pickle; re-create the file")


def load_pickle(source: str | Path | BinaryIO, *, name: str | Path | None = None) -> Any:
    """Unpickle a file (or an open binary stream) through :class:`RestrictedUnpickler`.

    Any refusal, truncation or corruption raises :class:`UnsafeFileError` naming the file.
    """
    label = str(name if name is not None else source)
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                return RestrictedUnpickler(handle, source=label).load()
        return RestrictedUnpickler(source, source=label).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as err:
        raise UnsafeFileError(f"{label}: not a readable pickle ({type(err).__name__}: {err}); the file is "
                              "truncated or corrupted -- copy or re-create it") from err


def load_npy(path: str | Path):
    """``numpy.load`` of an ``.npy`` file; an object array (NeMo's packed format) is unpickled restrictedly."""
    import numpy as np

    path = Path(path)
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            reader = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if reader is None:
                raise ValueError(f"unsupported .npy version {version}")
            _, _, dtype = reader(handle)
        except ValueError as err:
            raise UnsafeFileError(f"{path}: not a valid .npy file ({err}); re-create it") from err
        if not dtype.hasobject:
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        array = load_pickle(handle, name=path)
    if not isinstance(array, np.ndarray):
        raise UnsafeFileError(f"{path}: holds a {type(array).__name__}, not an array; re-create it")
    return array


def torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a refused or damaged file is an UnsafeFileError naming it."""
    import torch

    _torch_load_check(Path(path), str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- checkpoint directories --------------------------------------------------------------------------------

def _torch_load_check(data: bytes | Path, label: str) -> None:
    import torch

    try:
        torch.load(io.BytesIO(data) if isinstance(data, bytes) else data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(f"{label}: refusing to load: it holds objects torch.load(weights_only=True) does "
                              f"not admit ({first[:160]}); nothing was run -- re-create it from its source") from err
    except Exception as err:  # truncated zip, bad magic: a damaged file, named
        raise UnsafeFileError(f"{label}: unreadable ({type(err).__name__}: {str(err)[:160]}); the file is "
                              "truncated or corrupted -- copy or re-create it") from err


def check_dcp_metadata(metadata_file: Path) -> Any:
    """Read a torch DCP ``.metadata`` restrictedly and check the data files it points to; returns it."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    metadata = load_pickle(metadata_file)
    if not isinstance(metadata, Metadata):
        raise UnsafeFileError(f"{metadata_file}: holds a {type(metadata).__name__}, not torch distributed-"
                              "checkpoint Metadata; re-create the checkpoint")
    root = metadata_file.parent
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        relative = str(getattr(info, "relative_path", ""))
        target = (root / relative)
        if not relative or os.path.isabs(relative) or ".." in Path(relative).parts:
            raise UnsafeFileError(f"{metadata_file}: points outside its directory ({relative!r}); re-create it")
        if relative not in sizes:
            if not target.is_file():
                raise UnsafeFileError(f"{target}: missing (listed in {metadata_file.name}); the checkpoint is "
                                      "incomplete -- copy it again or re-create it")
            sizes[relative] = target.stat().st_size
        end = int(info.offset) + int(info.length)
        if end > sizes[relative]:
            raise UnsafeFileError(f"{target}: truncated ({sizes[relative]} bytes, {metadata_file.name} needs "
                                  f"{end}); the copy or write was interrupted -- copy it again or re-create "
                                  "the checkpoint")
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            if getattr(info, "transform_descriptors", None):
                raise UnsafeFileError(f"{target}: item {index.fqn!r} is stored with transforms "
                                      f"{list(info.transform_descriptors)} that nemotune does not read")
            with open(target, "rb") as handle:
                handle.seek(int(info.offset))
                blob = handle.read(int(info.length))
            _torch_load_check(blob, f"{target} (item {index.fqn!r})")
    return metadata


def check_checkpoint_files(directory: str | Path) -> None:
    """Refuse a checkpoint directory holding anything that would run code when megatron / torch read it.

    Every ``.metadata`` (torch DCP, a pickle) goes through the restricted unpickler, the byte items it
    lists and every ``.pt`` file (megatron's ``common.pt``, RNG states) through
    ``torch.load(weights_only=True)``; tensor items must lie inside their ``.distcp`` files.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        if path.name.endswith(".metadata"):
            check_dcp_metadata(path)
        elif path.suffix in (".pt", ".pth"):
            _torch_load_check(path, str(path))
