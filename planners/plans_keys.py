"""The names PUMIT writes into nnU-Net plans files, in one place for the planner and the trainer.

nnU-Net keeps unknown keys of a configuration, so our planner stores its choices there and our
trainer reads them back. A plans file stores the network as a dotted path (resolved with
``pydoc.locate``); that path must keep importing for plans written by earlier versions.
"""

PUMIT_PLANS_NAME = "PUMITPlans"
NETWORK_CLASS_NAME = "pumit_seg.models.seg_net.PUMITSegNet"

# configuration-level keys (also read at the plans' top level where noted by the reader)
PRETRAINED_WEIGHTS_PLANS_KEY = "pumit_pretrained_weights"
ANISO_D_CHOICE_PLANS_KEY = "pumit_aniso_d_choice"
OVERSAMPLE_PLANS_KEY = "pumit_oversample_foreground_percent"
PREDICT_STEP_SIZE_PLANS_KEY = "pumit_predict_step_size"
PRESET_PLANS_KEY = "pumit_preset"
MODEL_PLANS_KEY = "pumit_model"
NORM_EPS_CHOICE_PLANS_KEY = "pumit_norm_eps_choice"
MEMORY_ESTIMATE_PLANS_KEY = "pumit_memory_estimate_gb"
# plans-level keys
CT_WINDOW_PLANS_KEY = "pumit_ct_window"
FINGERPRINT_INTENSITY_PLANS_KEY = "pumit_fingerprint_intensity_properties"
