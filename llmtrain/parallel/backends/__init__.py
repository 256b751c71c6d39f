"""Optional engines behind `llmtrain.parallel.engine.Engine`: DeepSpeed and megatron-core.

Importing `deepspeed` or `megatron` modules here needs the package installed; `build_engine` turns the
ImportError into the install command. `ds_config` is importable without them; megatron's weight format
(pure tensor code) lives in `llmtrain.checkpoint.megatron_format`, so tools read it without megatron.
"""
