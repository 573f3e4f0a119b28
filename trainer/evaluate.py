"""`python -m trainer.evaluate CHECKPOINT --data SHARDS_SPLIT_DIR`: runs the evaluation CLI
(trainer.evaluation.cli); the evaluation itself lives in trainer/evaluation/."""

if __name__ == "__main__":
    from trainer.evaluation.cli import main

    raise SystemExit(main())
