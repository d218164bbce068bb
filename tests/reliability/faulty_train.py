"""``python tests/reliability/faulty_train.py fit ...``: train.py with the faults that the
ROBUQ_FAULT_* environment variables name (see faultkit.py) installed first.

sys.argv[0] stays this file, so Lightning's DDP launcher re-runs it (faults included) for the
other ranks (runpy.run_path would set argv[0] to train.py)."""

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(HERE)]

import faultkit  # noqa: E402

if __name__ == "__main__":
    faultkit.install_from_env()
    spec = importlib.util.spec_from_file_location("robuq_train_entry", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    from robuq.checkpoint import RunLockError

    try:  # as train.py's __main__ block
        train.main()
    except RunLockError as e:
        sys.exit(f"train.py: {e}")
