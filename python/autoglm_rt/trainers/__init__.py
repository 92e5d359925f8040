"""Small training scripts that run under torchrun or ``autoglm-rt queue`` (each is also a plain
script: its directory holds nothing that could shadow a standard-library module)."""
