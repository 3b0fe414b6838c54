//! See sluice_h1::properties::detect for the property.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice_h1::properties::detect(data));
