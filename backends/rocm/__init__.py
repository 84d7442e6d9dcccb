"""AMD GPUs through a HIP build of torch: the CUDA backend's code with AMD's facts and tuning."""
