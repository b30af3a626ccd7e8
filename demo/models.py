"""The shapes models the pack ships: the SD1.x-class one and shapes-SDXL, by the names scripts use."""
from . import model as sd1
from . import model_sdxl as sdxl

MODELS = {"sd1": sd1, "sdxl": sdxl}  # each: WEIGHTS, PIXELS, load, build, save, encode_scene, condition, ...
