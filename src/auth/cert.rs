//! Client certificates (`[auth.certificate]`): the identity a verified
//! certificate gives.

/// The user a client certificate names.
#[derive(Debug, Clone)]
pub struct CertIdentity {
    /// Username from the certificate (CN, SAN email or UPN, as configured).
    pub name: String,
    /// Groups from the certificate (OU) or the mapping.
    pub groups: Vec<String>,
    /// Where each group came from.
    pub groups_from: Vec<String>,
    /// Subject, for logs.
    pub subject: String,
}
