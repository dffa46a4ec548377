//! The AUTOMATIC1111 `parameters` text (what civitai and image viewers read).
