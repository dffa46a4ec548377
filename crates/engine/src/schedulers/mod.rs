//! Samplers: each reproduces its diffusers counterpart built with
//! `from_config(<model's scheduler_config.json>)`. One file per sampler behind [`Scheduler`].
