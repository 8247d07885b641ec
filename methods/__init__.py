"""Built-in sfdabench methods (installed as ``sfdabench_methods``); each module is one plugin."""
