"""`python -m trainer.evaluation CHECKPOINT --data SPLIT_DIR`: the same CLI as `python -m trainer.evaluate`."""

from trainer.evaluation.cli import main

raise SystemExit(main())
