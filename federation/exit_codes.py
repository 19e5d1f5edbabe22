"""Exit codes shared by every ``fledger`` command (documented in README.md, "Exit codes").

Scripts and systemd tell the cases apart by number: a tampered ledger needs an investigation,
an unreachable broker a retry, a usage error a fix to the command line or the files it names.
"""

from __future__ import annotations

OK = 0
TAMPERED = 1  # a ledger, proof or chain failed verification, or a signed history contradicts itself
USAGE = 2  # bad command line, setting, key file, registry, task or data file (argparse uses 2 too)
TIMEOUT = 3  # a --timeout passed before the command's goal was reached
UNREACHABLE = 4  # the broker cannot be reached or refused the login
# 5: local state is behind, forked, corrupt or in use by another process: start refused; or a running
# coordinator stopped (another writer of its ledger, storage failed)
STATE = 5
INTERNAL = 70  # a bug (sysexits' EX_SOFTWARE); the log has the traceback
INTERRUPTED = 130  # SIGINT

MEANING: dict[int, str] = {
    OK: "success",
    TAMPERED: "verification failed: tampering, corruption or a contradiction in signed history",
    USAGE: "usage error: bad command line, setting, key, registry, task or data file",
    TIMEOUT: "timed out before reaching the goal",
    UNREACHABLE: "cannot reach the broker, or it refused the login",
    STATE: "local state is behind, forked, corrupt or in use: start refused (or a running coordinator stopped)",
    INTERNAL: "internal error (a bug): see the log",
    INTERRUPTED: "interrupted",
}
