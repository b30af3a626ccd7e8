"""ComfyUI-ACT's math core: Activation Transport (AcT, Linear-AcT) in pure PyTorch.

No ComfyUI import here: fit maps from pooled activations, apply them with a strength, fold them into
norm weights, and read/write the safetensors maps file, from any script or host.

    maps = TransportMaps({name: fit_layer(source[name], target[name]) for name in source},
                         info={"family": "SD15", "method": "linear"})
    save_maps(maps, "watercolor.safetensors")
    y = load_maps("watercolor.safetensors")[name].apply(x, strength=0.7)

`LayerMap.apply` is the reference; `act_core.kernels.transport(layer, strength)` gives the same
function running one Triton kernel per call on CUDA tensors (the reference elsewhere).
"""
from .estimators import METHODS, SUPPORTS, AffineFit, fit_affine, quantile_pairing, sorted_pairs, support_bounds, wasserstein1
from .fileformat import FORMAT_VERSION, MapsFileError, load_maps, maps_from_bytes, maps_to_bytes, save_maps
from .maps import (CONV_FORMS, DEFAULT_SUPPORTS, LayerMap, TransportMaps, check_strength, default_support, fit_layer,
                   layer_movement)

__all__ = [
    "METHODS", "SUPPORTS", "AffineFit", "fit_affine", "quantile_pairing", "sorted_pairs", "support_bounds",
    "wasserstein1", "FORMAT_VERSION", "MapsFileError", "load_maps", "maps_from_bytes", "maps_to_bytes",
    "save_maps", "CONV_FORMS", "DEFAULT_SUPPORTS", "LayerMap", "TransportMaps", "check_strength", "default_support",
    "fit_layer", "layer_movement",
]
