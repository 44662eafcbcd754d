"""Checkpoints that are whole or refused.

RLlib writes a checkpoint's files in place and Tune copies them to storage in no fixed order, and RLlib's restore
silently skips a missing component: a checkpoint cut short by a crash could load as fresh weights. SPPO writes a
manifest (every file, its size and CRC-32) last and refuses to restore without a matching one (a checkpoint cut
short, or corrupted since); Tune's restore of a trial then takes the newest intact one. A checkpoint that cannot be
written (a full disk) stops training with an error naming it, its cause and the previous checkpoint, which stays
intact; what was written of it is removed or, lacking its manifest, refused.
"""

import json
import logging
import tempfile
import zlib
from pathlib import Path

import pyarrow.fs

from rllib_sppo.private_api import trial_storage
from rllib_sppo.watchdog import deadline

logger = logging.getLogger(__name__)

#: The part a stuck learner is named by when it does not give its state for a checkpoint (learner_update_timeout_s).
READING_STATE = "reading the algorithm's state (the learners' weights and optimizer states, for a checkpoint)"
#: Written last into every SPPO checkpoint: its files, their sizes and CRC-32s.
MANIFEST_FILE = "sppo_manifest.json"


class IncompleteCheckpointError(ValueError):
    """A checkpoint whose files disagree with its manifest: cut short, or changed since it was written."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failed copy to storage); earlier checkpoints are intact."""


def _cause(error: BaseException) -> str:
    """The last line of an error's text: the innermost cause of a Ray error, the message of an OSError."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _file_sizes(filesystem, path) -> dict:
    path = str(path).rstrip("/")
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
    return {i.path[len(path) + 1:]: i.size for i in infos
            if i.type == pyarrow.fs.FileType.File and i.base_name != MANIFEST_FILE}


def _crc32(filesystem, path) -> int:
    crc = 0
    with filesystem.open_input_stream(path) as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _digests(filesystem, path) -> dict:
    """{file: [size, CRC-32]} of a checkpoint's files, the manifest excepted."""
    return {name: [size, _crc32(filesystem, f"{path}/{name}")] for name, size in _file_sizes(filesystem, path).items()}


def check_checkpoint(path, filesystem=None) -> None:
    """Raises ``IncompleteCheckpointError`` unless every file the checkpoint's manifest lists is there with its size
    and CRC-32 (a checkpoint cut short by a crash or a full disk, or changed since it was written)."""
    fs, where = (filesystem, str(path)) if filesystem else pyarrow.fs.FileSystem.from_uri(str(path))
    try:
        with fs.open_input_stream(f"{where}/{MANIFEST_FILE}") as f:
            expected = json.loads(f.read())
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"{path} is not a complete SPPO checkpoint: it has no {MANIFEST_FILE} "
                                        "(writing or copying it was cut short)") from None
    found = _file_sizes(fs, where)
    missing = sorted(name for name, (size, _) in expected.items() if found.get(name) != size)
    if missing:
        raise IncompleteCheckpointError(f"{path} is not a complete SPPO checkpoint: {len(missing)} file(s) missing or "
                                        f"cut short, e.g. {missing[0]}")
    changed = sorted(name for name, (_, crc) in expected.items() if _crc32(fs, f"{where}/{name}") != crc)
    if changed:
        raise IncompleteCheckpointError(f"{path} is not a complete SPPO checkpoint: {len(changed)} file(s) changed "
                                        f"since it was written (CRC-32), e.g. {changed[0]}")


class IntactCheckpoints:
    """An Algorithm's checkpoints (``save_to_path``, Tune's ``save``) end with a manifest, and its restores
    (``restore_from_path``, Tune's ``load_checkpoint``) refuse a checkpoint without a matching one."""

    _last_checkpoint = None  # the newest checkpoint this trial wrote or restored (named if a write fails)

    def save_to_path(self, path=None, *, state=None, filesystem=None, use_msgpack=False) -> str:
        if filesystem is None:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(str(path or tempfile.mkdtemp()))
        manifest = f"{path}/{MANIFEST_FILE}"
        fresh = filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound or not _file_sizes(filesystem, path)
        if filesystem.get_file_info(manifest).type != pyarrow.fs.FileType.NotFound:
            filesystem.delete_file(manifest)  # overwriting: incomplete until the new manifest is written
        try:
            # RLlib writes the learners' part through each component's own save_to_path, outside get_state: a learner
            # stopped then would hang the trial for good, so the whole write is bounded like a learner update.
            with deadline(READING_STATE, self.config.learner_update_timeout_s, "learner_update_timeout_s"):
                super().save_to_path(path, state=state, filesystem=filesystem, use_msgpack=use_msgpack)
            with filesystem.open_output_stream(manifest) as f:
                f.write(json.dumps(_digests(filesystem, path)).encode())
        except Exception as e:
            left = "it has no manifest, so restoring it is refused"
            if fresh:
                try:
                    filesystem.delete_dir(path)
                    left = "what was written of it is removed"
                except OSError:
                    pass
            raise CheckpointWriteError(f"checkpoint {path} could not be written ({_cause(e)}); {left}") from e
        return path

    def save(self, checkpoint_dir=None):
        """Tune's checkpoint: written to a local folder, then copied to the trial's storage. A failure of either stops
        training with an error naming the checkpoint, the cause and the previous checkpoint (intact; Tune restores it
        when ``max_failures`` allows a retry); a copy cut short is removed from storage."""
        storage = trial_storage(self)
        index = storage.current_checkpoint_index if storage else None
        try:
            result = super().save(checkpoint_dir)
        except Exception as e:
            where = left = ""
            if storage and storage.current_checkpoint_index != index:  # written locally, the copy to storage failed
                where, left = f" to {storage.checkpoint_fs_path}", "; it has no manifest, so restoring it is refused"
                try:
                    storage.storage_filesystem.delete_dir(storage.checkpoint_fs_path)
                    left = "; what was copied of it is removed"
                except OSError:
                    pass
            previous = (f"the previous checkpoint {self._last_checkpoint} is intact and restores" if
                        self._last_checkpoint else "there is no earlier checkpoint")
            raise CheckpointWriteError(
                f"the checkpoint of iteration {self.iteration} could not be written{where}: {_cause(e)}{left}. "
                f"Training stops; {previous} (free space or fix the storage, then resume: rllib train file ... "
                f"--resume).") from e
        self._last_checkpoint = result.checkpoint.path
        return result

    def load_checkpoint(self, checkpoint_dir) -> None:
        """Tune's restore of a trial (after a failure, or ``--resume``): a checkpoint that is incomplete or corrupt is
        refused, and the newest intact earlier checkpoint of the trial (``checkpoint_*`` beside it) restores instead,
        with an error naming both."""
        try:
            super().load_checkpoint(checkpoint_dir)
            self._last_checkpoint = checkpoint_dir
            return
        except IncompleteCheckpointError as e:
            refused = e
        newest = Path(checkpoint_dir)
        for earlier in sorted(newest.parent.glob("checkpoint_*"), reverse=True):
            if earlier.name >= newest.name:
                continue
            try:
                check_checkpoint(earlier)
            except IncompleteCheckpointError:
                continue
            logger.error("%s; restoring the newest intact earlier checkpoint, %s, instead.", refused, earlier)
            super().load_checkpoint(str(earlier))
            self._last_checkpoint = str(earlier)
            return
        raise refused

    def restore_from_path(self, path, *, component=None, filesystem=None, **kwargs) -> None:
        if component is None:  # a whole checkpoint (not one component's folder)
            check_checkpoint(path, filesystem)
        super().restore_from_path(path, component=component, filesystem=filesystem, **kwargs)
