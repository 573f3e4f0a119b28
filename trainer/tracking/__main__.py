"""`python -m trainer.tracking upload RUN_DIR [--tracking-uri URI]` (trainer.tracking.upload)."""

from trainer.tracking.upload import main

raise SystemExit(main())
