"""Transfer sets on disk (SPEC §7, §8): sharded, checksummed, atomically written, resumable.

Modules: :mod:`~dfkd_fast.transfer_set.writer` (``TransferSetWriter``, ``write_tensors``),
:mod:`~dfkd_fast.transfer_set.reader` (``TransferSet``), :mod:`~dfkd_fast.transfer_set.manifest` (format,
checksums, teacher fingerprint, ``finalize_manifest``), :mod:`~dfkd_fast.transfer_set.export` (``export_png``).

Layout of ``out_dir``::

    meta.json                             method, hyper-parameters, teacher fingerprint, versions (at open)
    shard-{rank:03d}-{index:06d}.safetensors   images (uint8 or fp16), teacher_logits, targets, seeds
                                          (format 1 named the logits soft_labels; still readable)
    journal-{rank:03d}.jsonl              one line per committed shard: file, count, sha256
    state-{rank:03d}.pt                   optional synthesizer state (torch.save, weights_only-loadable)
    done-{rank:03d}.json                  the rank's shard list, written by ``close()``
    manifest.json                         everything :class:`TransferSet` needs; written last, with
                                          manifest_sha256 (checked on read: an edited manifest is refused)
    .lock                                 flock of the running ``dfkd-fast synthesize`` (dfkd_fast._lock)

Commit protocol: a shard is written to ``<name>.tmp``, fsynced and ``os.replace``d to its final name, then a
journal line is appended and fsynced -- the journal line is the commit point. A state saved with a shard
(``add(..., state=...)`` / ``writer.state = ...``) is written after the shard file and before its journal line,
recording the shard as ``pending``; resume commits a pending shard whose file is intact, so a committed shard
always has its state. ``resume=True`` deletes temp
files and shard files without a journal line, checks the sha256 of every committed shard (a mismatch is an
error, never silently dropped) and continues numbering after the last one, so no finished shard is duplicated
or lost. Synthesizer state: ``writer.state = synth.state_dict()`` first flushes the buffer (possibly a short
shard) and commits it with the state (above), recording how many shards the state covers. If a crash leaves
committed shards newer than the saved state, resuming rolls the journal back to the state (those images will be
regenerated from it exactly once); without any saved state every committed shard is kept and the caller
continues from ``writer.num_images`` -- unless the writer is ``stateful=True``, where no state means a restart.
"""
from dfkd_fast.transfer_set.export import class_folders, export_png
from dfkd_fast.transfer_set.manifest import (
    FORMAT,
    FORMAT_VERSION,
    add_to_manifest,
    finalize_manifest,
    sha256_file,
    teacher_fingerprint,
)
from dfkd_fast.transfer_set.reader import TransferSet
from dfkd_fast.transfer_set.writer import TransferSetWriter, write_tensors
from dfkd_fast.viz import save_grid

__all__ = ["TransferSetWriter", "TransferSet", "export_png", "teacher_fingerprint", "finalize_manifest",
           "save_grid", "sha256_file", "FORMAT", "FORMAT_VERSION", "write_tensors", "add_to_manifest",
           "class_folders"]
