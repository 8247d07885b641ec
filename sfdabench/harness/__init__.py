"""The run: config, registry, protocol, evaluation, results, source models, data preparation."""
