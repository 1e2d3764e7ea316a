"""HF -> megatron conversion as on a GPU node: the device helper reports CUDA
(``compat.cuda_available``, once the gloo process group is up). Prints
``TRAINING_DEVICE <type>`` (where a training build would go) and ``BUILT
<json>``: the device types of every parameter and buffer of each model the
conversion built, and whether any module is Transformer Engine's.

    python tests/distributed/scripts/convert_cuda_reported.py HF_DIR OUT_DIR
"""

import json
import sys

from megatron_dpo.checkpoint import hf_import
from megatron_dpo.parallel import compat
from megatron_dpo.parallel.init import get_device, init_distributed, shutdown


def main() -> None:
    hf_dir, out_dir = sys.argv[1:3]
    init_distributed()
    compat.cuda_available = lambda: True
    built = []
    build_model = hf_import.build_model

    def recording_build_model(*args, **kwargs):
        chunks = build_model(*args, **kwargs)
        tensors = [t for chunk in chunks for t in (*chunk.parameters(), *chunk.buffers())]
        modules = [type(m).__module__ for chunk in chunks for m in chunk.modules()]
        built.append({"devices": sorted({t.device.type for t in tensors}),
                      "transformer_engine": any(name.startswith("transformer_engine") for name in modules)})
        return chunks

    hf_import.build_model = recording_build_model
    print("TRAINING_DEVICE", get_device().type, flush=True)
    hf_import.hf_to_megatron(hf_dir, out_dir)
    print("BUILT", json.dumps(built), flush=True)
    shutdown()


# The guard matters: dist_checkpointing's writer re-imports the main module.
if __name__ == "__main__":
    main()
