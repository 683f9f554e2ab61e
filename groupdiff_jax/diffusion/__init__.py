"""DiT's Gaussian diffusion (DDPM): schedules, losses, samplers (the `objective=dit` counterpart of transport.py)."""

from groupdiff_jax.diffusion.gaussian_diffusion import (
    NUM_TIMESTEPS, DiffusionSchedule, ModelPosterior, approx_standard_normal_cdf, ddim_sample,
    ddim_step, ddpm_sample, discretized_gaussian_log_likelihood,
    linear_beta_schedule, make_schedule, mean_flat, normal_kl, p_mean_variance,
    p_sample_step, predict_eps_from_x0, predict_x0_from_eps,
    q_mean_variance, q_posterior_mean_variance, q_sample,
    sample_group_timesteps, sample_loop, training_loss_terms, training_losses,
    vb_terms_bpd)
from groupdiff_jax.diffusion.respace import create_schedule, respaced_betas, space_timesteps
