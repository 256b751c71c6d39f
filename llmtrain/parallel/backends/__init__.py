"""Optional engines behind `llmtrain.parallel.engine.Engine`: DeepSpeed and megatron-core.

Importing `deepspeed` or `megatron` modules here needs the package installed; `build_engine` turns the
ImportError into the install command. `ds_config` and `megatron_convert` are importable without them.
"""
