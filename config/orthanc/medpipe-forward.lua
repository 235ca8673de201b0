-- Orthanc (compose service `orthanc`): forward each new instance of a stable study to the medpipe gateway, once.
-- The gateway's SCP acknowledges each instance once it is spooled to disk and sends its structured report back to
-- this Orthanc (C-STORE, --results-to dimse://ORTHANC@orthanc:4242).
-- A study turns stable again when medpipe's own SR (and SC) lands in it, or when a late series arrives: only the
-- instances not yet forwarded go then, so each study is scored once, and a late series re-opens it with its own
-- instances (the gateway re-scores the whole study). Forwarded instances carry the metadata MedpipeForwarded
-- (declared under UserMetadata in orthanc.json); SR series and anything medpipe made are never sent back.
function OnStableStudy(studyId, tags, metadata)
  local own = {}
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local main = series['MainDicomTags']
    if main['Modality'] == 'SR' or main['Manufacturer'] == 'medpipe' then
      own[series['ID']] = true
    end
  end
  local forward = {}
  for _, instance in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))) do
    if not own[instance['ParentSeries']] then
      local sent = false
      for _, name in pairs(ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/metadata'))) do
        if name == 'MedpipeForwarded' then sent = true end
      end
      if not sent then
        table.insert(forward, instance['ID'])
      end
    end
  end
  if #forward > 0 then
    -- synchronous: an instance is marked only once the gateway acknowledged it (a failed store raises, unmarked)
    RestApiPost('/modalities/medpipe/store', DumpJson({Resources = forward, Synchronous = true}))
    for _, id in pairs(forward) do
      RestApiPut('/instances/' .. id .. '/metadata/MedpipeForwarded', 'yes')
    end
  end
end
