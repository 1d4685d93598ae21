"""Declarative EHR-SR search spaces: YAML files validated on load, sampled through Optuna.

A space file has three top-level keys (``docs/search_spaces.md`` is the reference)::

    description: free text
    model:                       # EHRSRConfig fields by dotted name
      width: {choices: [8, 16, 24]}          # categorical
      msg.levels: {low: 0, high: 2}          # int (optional step, or log)
      fsb.cutoff: {low: 0.1, high: 0.5}      # float (optional log, or step)
      wab.window_size: 4                     # fixed value
    training:                    # the fidelity: what one trial trains with
      patch_size: 32
      batch_size: 8
      lr: {low: 2.0e-4, high: 2.0e-3, log: true}
      min_steps: 20
      eta: 3
      max_steps: 180
      seconds_per_trial_estimate: 20

Conditional parameters follow from the config's structure, not from extra syntax:

* every hyperparameter of a module section (``wab``, ``ssm``, ``fsb``, ``moe``, ``repmix``,
  ``noise``) is sampled only when that module's ``enabled`` toggle is true; the toggle must be in
  the space;
* ``msg.depths`` gives one distribution that each level's depth is drawn from, as the parameters
  ``msg.depth1`` .. ``msg.depth3`` (one name per level, so the distribution of a name never
  changes within a study, as Optuna requires); depth ``i`` is sampled only when
  ``msg.levels >= i``;
* ``msg.skip_fusion``, ``msg.attention_gate``, ``msg.downsample`` and ``trunk_level_offset`` are
  sampled only when ``msg.levels >= 1``;
* ``trunk_level_offset`` (space-only) places the trunk that many levels above the lowest:
  ``trunk_level = msg.levels - offset`` (0 keeps the config default, the lowest level). It keeps
  one distribution whatever the number of levels, which ``trunk_level`` itself could not.

The task fields (``scale``, ``in_channels``, ``out_channels``) belong to the command line, not to
the space; ``suggest`` and ``config_from_params`` take ``scale``.

The package has one module per concern: ``config_fields`` (reflection over ``EHRSRConfig``),
``parser`` (YAML with line numbers), ``distributions`` (parameters and their representative
values), ``fidelity`` (the training section and the ``TrainSettings`` of a trial), ``sampling``
(``SearchSpace``, ``SampledConfig``), ``feasibility`` (probing values against the config) and
``loading`` (shipped spaces and files).
"""

from __future__ import annotations

from ehrsr.search.space.errors import SearchSpaceError
from ehrsr.search.space.fidelity import Fidelity
from ehrsr.search.space.loading import SPACES_DIR, load_space, shipped_spaces, space_from_text
from ehrsr.search.space.sampling import SampledConfig, SearchSpace

__all__ = [
    "SPACES_DIR",
    "Fidelity",
    "SampledConfig",
    "SearchSpace",
    "SearchSpaceError",
    "load_space",
    "shipped_spaces",
    "space_from_text",
]
