"""The paper's optimiser (Section IV-C): Adam, beta1 0.9, L2 weight decay 1e-4, lr 2e-4 / 10 every
5 epochs.

PyTorch's ``Adam(weight_decay=wd)`` adds ``wd * param`` to the gradient *before* the moment
estimates (L2 regularisation, not AdamW's decoupled decay); ``add_decayed_weights`` placed before
``scale_by_adam`` is exactly that. Like PyTorch's default, it applies to every parameter (BatchNorm
scales and biases included).
"""

import optax


def learning_rate_schedule(optim_config, steps_per_epoch: int) -> optax.Schedule:
  """Staircase decay: ``lr * factor ** floor(step / (every_epochs * steps_per_epoch))``."""
  return optax.exponential_decay(
      init_value=optim_config.learning_rate,
      transition_steps=max(1, optim_config.lr_decay_every_epochs * steps_per_epoch),
      decay_rate=optim_config.lr_decay_factor, staircase=True)


def make_optimizer(optim_config, steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam with L2 weight decay added to the gradient and the step schedule above."""
  return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay),
      optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps),
      optax.scale_by_learning_rate(learning_rate_schedule(optim_config, steps_per_epoch)),
  )
