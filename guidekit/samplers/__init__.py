"""Samplers, schedules and model adapters. Samplers are plain functions over a denoiser."""
