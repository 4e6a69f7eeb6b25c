//! Who an X.509 certificate names: its subject and first common name, for the API's roles by
//! client certificate and for the cluster's peers (whose `node_id` is their certificate's).

/// The subject of a DER certificate as a string (`CN=..., O=...`) and its first common name.
pub fn subject(der: &[u8]) -> Result<(String, Option<String>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let subject = cert.subject();
    let common_name = subject
        .iter_common_name()
        .next()
        .map(|cn| cn.as_str().map(str::to_owned).map_err(|e| e.to_string()))
        .transpose()?;
    Ok((subject.to_string(), common_name))
}

/// The common name of the first certificate in a PEM file's text.
pub fn pem_common_name(pem: &[u8]) -> Result<Option<String>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| e.to_string())?;
    subject(&pem.contents).map(|(_, cn)| cn)
}
