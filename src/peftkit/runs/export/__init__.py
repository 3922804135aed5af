"""Taking a fine-tune elsewhere: a merged transformers folder (folder.py), GGUF files for llama.cpp, Ollama and
LM Studio (gguf_model.py, gguf_lora.py, gguf.py), and an Ollama Modelfile (ollama.py)."""

from peftkit.runs.export.folder import DTYPES, merge_to_folder, save_model_folder

__all__ = ["DTYPES", "merge_to_folder", "save_model_folder"]
