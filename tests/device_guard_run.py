"""`pretrain_looped.py` under the device guard (tests/device_guard.py): every collective checks that its
tensors live on the accelerator's device. Same arguments as pretrain_looped.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import device_guard  # noqa: E402

if __name__ == "__main__":
    device_guard.install()
    from megaloop.training.cli import main
    sys.exit(main())
