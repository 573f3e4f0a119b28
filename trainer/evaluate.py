"""`python -m trainer.evaluate CHECKPOINT --data SHARDS_SPLIT_DIR`: runs the evaluation CLI
(trainer.evaluation.cli); the evaluation itself lives in trainer/evaluation/. The names this module exported
before (evaluate, EvalResult, embed, deduplicate, gather_to_rank0) still resolve, with a DeprecationWarning."""
import warnings

_MOVED = ("EvalResult", "deduplicate", "embed", "evaluate", "gather_to_rank0")


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"trainer.evaluate.{name} moved to trainer.evaluation.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        import trainer.evaluation
        return getattr(trainer.evaluation, name)
    raise AttributeError(f"module 'trainer.evaluate' has no attribute {name!r}")


if __name__ == "__main__":
    from trainer.evaluation.cli import main

    raise SystemExit(main())
