"""ComfyUI entry point: ComfyUI imports this folder as a package and reads the two mappings below.

Relative imports only: ComfyUI has its own top-level `nodes` module, and this folder may be named anything.
"""
from .nodes import load_node_mappings

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, _failed = load_node_mappings()

# The editor loads the .js files here: one shows the caption of Sora Prompt Expansion on the node.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
