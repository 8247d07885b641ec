"""Built-in sfdabench dataset adapters (installed as the import package ``sfdabench_datasets``)."""
