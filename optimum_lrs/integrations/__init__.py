"""The host libraries' entry points: the transformers and optimum quantizers, PEFT, the command line."""
