"""A run's plumbing, apart from the paper's algorithm in ddpo.py: files written whole or not at all (files),
several processes (processes), checkpoints and run folders (checkpoints), pictures and curves (pictures), the command
line (command_line), a model folder read into its parts (model_folders) and checked (model_checks), and the
training loop's bookkeeping (training_run). Nothing here imports ddpo."""
