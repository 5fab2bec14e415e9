//! What operators change while the server runs: queued control requests,
//! the operator API, admissions and revocations, certificate renewal.

use super::*;

/// Admin and renewal's own state: who may connect (shared with the TLS
/// verifier, so removing a pseudonym refuses it at the next handshake), the
/// dashboard's logins, and the state directory enrollments are written to.
pub(super) struct Registry {
    pub(super) admitted: Arc<Admitted>,
    pub(super) logins: Arc<crate::operator::dashboard::LoginBook>,
    pub(super) dir: StateDir,
}

impl Registry {
    /// Signs a new certificate for a device's new key, once the device has
    /// proved it holds that key; refuses anything else with a reason.
    pub(super) fn renew(
        &self,
        store: &Store,
        client: Pseudonym,
        request: &RenewRequest,
        certificate: &[u8],
    ) -> Result<RenewedCertificate, String> {
        let proof = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &request.public_key,
        );
        proof
            .verify(&renewal_message(certificate), &request.proof)
            .map_err(|_| "the renewal proof does not verify for that P-256 key".to_owned())?;
        let enrollments = store.enrollments().map_err(|e| e.to_string())?;
        let current = enrollments
            .iter()
            .find(|e| e.pseudonym == client && e.revoked_unix.is_none())
            .ok_or_else(|| "no live enrollment for this certificate".to_owned())?;
        let (renewed, pseudonym) = self
            .dir
            .renew(store, current, &request.public_key)
            .map_err(|e| e.to_string())?;
        self.admitted.insert(pseudonym, current.role);
        info!(client = %client, renewed = %pseudonym, "certificate renewed");
        Ok(renewed)
    }
}

impl Hub {
    /// Applies requests queued by `covey-server enroll`, `revoke` and
    /// `evaluate` while the server runs.
    pub(super) fn apply_control(&mut self, now: Instant) -> Vec<Action<Pseudonym>> {
        let mut actions = Vec::new();
        let dir = &self.registry.dir;
        match dir.apply_requests(&self.store) {
            Ok(applied) => {
                for (p, role) in applied.admitted {
                    self.admit(p, role);
                }
                self.bar(applied.revoked);
                for (id, versions, timeout) in applied.evaluations {
                    actions.extend(self.start_evaluation(id, versions, timeout, now));
                }
            }
            Err(e) => warn!("cannot apply queued operator requests: {e}"),
        }
        if self.evaluation.as_ref().is_some_and(|e| now >= e.deadline) {
            self.finish_evaluation();
        }
        actions
    }

    pub(super) fn admit(&mut self, p: Pseudonym, role: Role) {
        self.registry.admitted.insert(p, role);
        info!(client = %p, %role, "enrolled by the operator");
    }

    /// Revoked or forgotten: refused from now on, and disconnected.
    pub(super) fn bar(&mut self, pseudonyms: Vec<Pseudonym>) {
        for p in pseudonyms {
            self.registry.admitted.remove(&p);
            self.devices
                .close(&p, CloseCode::Revoked, "enrollment revoked");
            warn!(client = %p, "revoked by the operator; connection closed");
        }
    }

    /// Answers an operator API request, after checking the caller's role;
    /// the request goes into the audit trail either way.
    pub(super) fn admin(
        &mut self,
        actor: Pseudonym,
        role: Role,
        request: AdminRequest,
    ) -> Result<AdminResponse, ServeError> {
        let allowed = role.may(&request);
        self.store.audit([AuditEvent::AdminRequest {
            actor,
            role,
            action: request.action().to_owned(),
            allowed: allowed.is_ok(),
        }])?;
        if let Err(denied) = allowed {
            warn!(client = %actor, %role, "operator request refused: {denied}");
            return Ok(AdminResponse::Refused {
                reason: denied.to_string(),
            });
        }
        let dir = &self.registry.dir;
        let reply = match request {
            AdminRequest::Status => Ok(AdminReply::Status(Box::new(Report::from_store(
                &self.store,
                role != Role::Auditor,
            )?))),
            AdminRequest::Report => {
                let built = dir.config().map_err(ReportError::from).and_then(|config| {
                    let report = ComplianceReport::build(&self.store, &config, &self.settings)?;
                    Ok(AdminReply::Report {
                        json: report.to_json(),
                        html: report.to_html()?,
                    })
                });
                return Ok(match built {
                    Ok(reply) => AdminResponse::Ok { reply },
                    Err(e) => AdminResponse::Refused {
                        reason: e.to_string(),
                    },
                });
            }
            AdminRequest::AuditExport => {
                let mut out = Vec::new();
                self.store.export_audit(&mut out)?;
                Ok(AdminReply::AuditExport {
                    jsonl: String::from_utf8_lossy(&out).into_owned(),
                })
            }
            AdminRequest::AuditPublicKey => Ok(AdminReply::AuditPublicKey {
                text: self.store.audit_public_key()?,
            }),
            AdminRequest::Enroll { name, days, role } => {
                if days == 0 || days > 3650 {
                    return Ok(AdminResponse::Refused {
                        reason: format!("days must be between 1 and 3650, got {days}"),
                    });
                }
                dir.enroll_as(
                    &self.store,
                    &name,
                    Duration::from_secs(days * 86_400),
                    None,
                    role,
                )
                .map(|(bundle, p)| {
                    self.admit(p, role);
                    AdminReply::Enrolled {
                        identity: bundle.to_toml(),
                    }
                })
            }
            AdminRequest::Revoke { name } => dir.revoke(&self.store, &name).map(|revoked| {
                let certificates = revoked.len();
                self.bar(revoked);
                AdminReply::Revoked { certificates }
            }),
            AdminRequest::Forget { name } => dir.forget(&self.store, &name).map(|forgotten| {
                let enrollments = forgotten.len();
                self.bar(forgotten);
                AdminReply::Forgotten { enrollments }
            }),
            AdminRequest::DashboardLogin { hours } => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                return Ok(match self.registry.logins.issue(actor, role, hours, now) {
                    Ok((token, expires_unix)) => AdminResponse::Ok {
                        reply: AdminReply::DashboardLogin {
                            token: token.to_text(),
                            expires_unix,
                        },
                    },
                    Err(e) => AdminResponse::Refused {
                        reason: e.to_string(),
                    },
                });
            }
            AdminRequest::DashboardLogout => self
                .registry
                .logins
                .revoke_all(actor)
                .map(|logins| AdminReply::DashboardLoggedOut { logins })
                .map_err(DirError::from),
        };
        Ok(match reply {
            Ok(reply) => AdminResponse::Ok { reply },
            Err(e) => AdminResponse::Refused {
                reason: e.to_string(),
            },
        })
    }
}
