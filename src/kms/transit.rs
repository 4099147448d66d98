//! Placeholder: filled in by the issue-10 work.

use std::sync::Arc;

use super::{Kms, KmsError};

/// Connects to this KMS.
///
/// # Errors
/// Always, until implemented.
pub fn open(_target: &super::remote::KmsUrl) -> Result<Arc<dyn Kms>, KmsError> {
    Err(KmsError::Unsupported("this KMS kind (not built yet)"))
}
