"""Export megaloop models to the Hugging Face format (see hf_export.py)."""
from megaloop.export.hf_export import export_hf, load_exported, register_hf
from megaloop.export.hf_files import hf_config
from megaloop.export.inputs import ExportError, check_state_dict, load_checkpoint, load_merged_state_dict

__all__ = ["ExportError", "check_state_dict", "export_hf", "hf_config", "load_checkpoint", "load_exported",
           "load_merged_state_dict", "register_hf"]
