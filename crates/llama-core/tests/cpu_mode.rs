//! `FASTLLAMA_DEVICE=cpu` hides CUDA (suite `core`). A binary of its own: it sets the variable
//! for the whole process.

use llama_core::{cuda, Device, Error, DEVICE_ENV};

#[test]
fn forcing_cpu_mode_hides_cuda() {
    std::env::set_var(DEVICE_ENV, "cpu");
    assert_eq!(Device::cuda_if_available(), Device::Cpu);
    assert_eq!(Device::from_env().unwrap(), Device::Cpu);
    let err = cuda::device_count().unwrap_err();
    assert!(err.to_string().contains("FASTLLAMA_DEVICE=cpu"), "{err}");
    assert!(matches!(
        cuda::CudaDevice::get(0),
        Err(Error::CudaUnavailable(_))
    ));

    std::env::set_var(DEVICE_ENV, "cuda:banana");
    assert!(Device::from_env().is_err());
}
