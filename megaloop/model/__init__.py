"""The looped model family (plain PyTorch). See megaloop/model/looped_block.py for the loop itself."""
from megaloop.model.looped_block import BlockOutput, LoopedBlock
from megaloop.model.looped_lm import LMOutput, LoopedLM, build_model
from megaloop.model.loop_schedule import LoopCount, sample_loops
from megaloop.model.mixers import MIXERS, register_mixer

__all__ = ["BlockOutput", "LoopedBlock", "LMOutput", "LoopedLM", "build_model", "LoopCount",
           "sample_loops", "MIXERS", "register_mixer"]
