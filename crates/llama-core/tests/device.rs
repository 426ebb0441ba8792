//! Devices and the CUDA probe on any machine (suite `core`): nothing panics without a driver.

use llama_core::cuda::{self, CudaDevice};
use llama_core::{Device, Error};

#[test]
fn device_names_parse() {
    assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
    assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
    assert_eq!("CUDA:3".parse::<Device>().unwrap(), Device::Cuda(3));
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
    let err = "tpu".parse::<Device>().unwrap_err();
    assert!(
        matches!(err, Error::UnknownDevice(ref s) if s == "tpu"),
        "{err}"
    );
    assert!("cuda:x".parse::<Device>().is_err());
}

#[test]
fn probing_cuda_agrees_with_opening_a_device() {
    let device = Device::cuda_if_available();
    match CudaDevice::get(0) {
        Ok(gpu) => {
            assert_eq!(device, Device::Cuda(0));
            assert!(gpu.arch().starts_with("sm_"));
        }
        Err(err) => {
            assert_eq!(device, Device::Cpu);
            assert!(matches!(err, Error::CudaUnavailable(_)), "{err}");
            assert!(err.to_string().starts_with("no CUDA device"), "{err}");
        }
    }
}

#[test]
fn a_missing_ordinal_is_an_error_value() {
    let count = cuda::device_count().unwrap_or(0);
    let err = CudaDevice::get(count + 7).unwrap_err();
    assert!(matches!(err, Error::CudaUnavailable(_)), "{err}");
}

#[test]
fn cuda_operations_without_a_device_return_errors() {
    if cuda::is_available() {
        return; // covered by tests/cuda.rs on GPU machines
    }
    let t = llama_core::Tensor::from_vec(vec![1.0f32; 4], 4).unwrap();
    assert!(matches!(
        t.to_device(Device::Cuda(0)),
        Err(Error::CudaUnavailable(_))
    ));
    assert!(llama_core::Tensor::zeros(4, llama_core::DType::F32, Device::Cuda(0)).is_err());
}
