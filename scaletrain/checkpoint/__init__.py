"""Checkpoints: ``store`` keeps the folders (atomic commit, ``latest``, keep-last-N, resume resolution);
``recovery`` puts right what a folder holds at start (a crash's leftovers, checkpoints past a rollback);
``manager`` decides what goes in them and when."""

from .manager import STATE_FILE, TOKENIZER_DIR, CheckpointManager
from .recovery import recover, set_aside_later
from .store import (
    COMPLETE,
    LATEST,
    CheckpointError,
    CheckpointStore,
    check_model_matches,
    complete_checkpoints,
    newest_checkpoint,
    read_meta,
    resolve_resume,
    step_name,
)

__all__ = ["COMPLETE", "LATEST", "STATE_FILE", "TOKENIZER_DIR", "CheckpointError", "CheckpointManager",
           "CheckpointStore", "check_model_matches", "complete_checkpoints", "newest_checkpoint", "read_meta",
           "recover", "resolve_resume", "set_aside_later", "step_name"]
