"""Built-in task families for meta-training and evaluation; none needs a download."""

from compiledopt.tasks.augment import AugmentedFamily, AugmentedTask
from compiledopt.tasks.base import Task, TaskFamily, task_seed
from compiledopt.tasks.digits import DigitsFamily, DigitsTask
from compiledopt.tasks.families import FAMILIES, get_family
from compiledopt.tasks.image_mlp import ImageMLPFamily, ImageMLPTask
from compiledopt.tasks.images import BarsFamily, BarsTask
from compiledopt.tasks.mixed import MixedFamily, MixedLMFamily
from compiledopt.tasks.regression import RegressionFamily, TeacherRegressionTask
from compiledopt.tasks.text_lm import TextLMFamily, TextLMTask

__all__ = [
    "FAMILIES",
    "AugmentedFamily",
    "AugmentedTask",
    "BarsFamily",
    "BarsTask",
    "DigitsFamily",
    "DigitsTask",
    "ImageMLPFamily",
    "ImageMLPTask",
    "MixedFamily",
    "MixedLMFamily",
    "RegressionFamily",
    "Task",
    "TaskFamily",
    "TeacherRegressionTask",
    "TextLMFamily",
    "TextLMTask",
    "get_family",
    "task_seed",
]
