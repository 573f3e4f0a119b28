"""`python -m trainer.deepspeed_engine export DS_DIR OUT.pt`: the CLI that turns a DeepSpeed checkpoint into a plain
state dict (trainer/engines/deepspeed_export.py); the DeepSpeed engine itself is trainer/engines/deepspeed.py."""
from trainer.engines.deepspeed_export import main

if __name__ == "__main__":
    raise SystemExit(main())
