"""Reading other people's checkpoints, and the builder that uses them.

* :mod:`pks4.weights.files`: any checkpoint file or folder -> ``{name: tensor}``; strict loading;
* :mod:`pks4.weights.clip`: CLIP vision towers (OpenAI, open_clip, Hugging Face) and what their files say;
* :mod:`pks4.weights.videomamba`: official VideoMamba checkpoints (image, video, masked pretraining) and pks4's;
* :mod:`pks4.weights.builder`: ``create_model(name, pretrained=...)``, the checkpoint read first.

This package sits above :mod:`pks4.models` (it builds models); models never import it.
"""
from __future__ import annotations

from pks4.weights.builder import create_model, model_from_config
from pks4.weights.clip import (ClipTowerCheckpoint, clip_tower_config, clip_vision_state_dict,
                               infer_clip_vision_config, load_pretrained_backbone, read_clip_tower)
from pks4.weights.files import (CheckpointError, LoadReport, load_state_dict_strict, read_checkpoint_file,
                                read_hf_config, read_open_clip_config)
from pks4.weights.videomamba import (VideoMambaLoadReport, convert_videomamba_state_dict, joint_pos_from_image,
                                     load_videomamba_checkpoint, load_videomamba_state_dict)

__all__ = [
    "CheckpointError", "LoadReport", "read_checkpoint_file", "read_hf_config", "read_open_clip_config",
    "load_state_dict_strict", "ClipTowerCheckpoint", "clip_vision_state_dict", "infer_clip_vision_config",
    "read_clip_tower", "clip_tower_config", "load_pretrained_backbone", "VideoMambaLoadReport",
    "load_videomamba_checkpoint", "load_videomamba_state_dict", "convert_videomamba_state_dict",
    "joint_pos_from_image", "create_model", "model_from_config",
]
