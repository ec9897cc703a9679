"""Which exceptions are the user's to fix, and their one-line form: shared by the CLI and the
stage processes of `retrieval experiment` (`error: ...`, exit status 2; anything else is a bug and
shows its traceback)."""
from __future__ import annotations

import errno


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix, reported on one line: the project's own, and
    ValueError / FileNotFoundError, which its stages raise with a message for bad input."""
    from cluster.errors import ClusterError

    from .config import ConfigError
    from .descriptors import DescriptorError
    from .errors import WeightsError
    from .groundtruth import GroundTruthError
    from .ingest import IngestError

    return (ConfigError, IngestError, DescriptorError, WeightsError, GroundTruthError, ClusterError, ValueError, FileNotFoundError)


# OS errors that are the user's to fix (space, quota, a read-only file system, permissions), not bugs:
# the graph stage's scratch rows (n x d x 4 bytes) or a shard may not fit on a full disk
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_user_error(e: BaseException) -> bool:
    return isinstance(e, user_errors()) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
