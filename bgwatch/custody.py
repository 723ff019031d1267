"""A user's file on disk, from the moment it is claimed to done/ or failed/: the one place that moves it.

Split along its seam: claims.py (take a file, give it back, return a silent host's claims) and
delivery.py (fenced delivery, outputs placed without replacing, parking, settling after a crash). This
module is the name the rest of bgwatch imports them by.
"""

from bgwatch.claims import (
    CLAIMED,
    DELIVERING,
    DONE_DIR,
    FAILED_DIR,
    WORK_DIR,
    Claim,
    check_host,
    error_note,
    is_user_file,
    note_name,
)
from bgwatch.delivery import (
    STORAGE_ERRNOS,
    TAKEN,
    Custody,
    DeliveryBlocked,
    Settled,
    Step,
)
from bgwatch.markers import DISPOSITIONS, MARKER

__all__ = ["CLAIMED", "DELIVERING", "DISPOSITIONS", "DONE_DIR", "FAILED_DIR", "MARKER", "STORAGE_ERRNOS", "TAKEN",
           "WORK_DIR", "Claim", "Custody", "DeliveryBlocked", "Settled", "Step", "check_host", "error_note",
           "is_user_file", "note_name"]
