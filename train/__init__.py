"""run_glue-style fine-tuning with vanilla fine-tuning, Child-Tuning-F and Child-Tuning-D."""
